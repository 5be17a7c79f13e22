"""Build script: maps the three source folders onto one import package and compiles ext/.

    interlink       <- bindings/   (public API, CLI, SDK)
    interlink.core  <- core/       (engine; pure-Python twins of every native module)
    interlink.ext   <- ext/        (Cython hot paths)
"""

import os
import runpy

from Cython.Build import cythonize
from setuptools import Extension, setup

# The one list of compiled modules and their twins (core/_select.py; it imports only the stdlib).
NATIVE_MODULES = list(runpy.run_path(os.path.join("core", "_select.py"))["TWINS"])

extensions = [
    Extension(f"interlink.ext.{name}", [os.path.join("ext", f"{name}.pyx")])
    for name in NATIVE_MODULES
]

setup(
    packages=[
        "interlink", "interlink.core", "interlink.core.protocol", "interlink.core.domain", "interlink.core.domain.auth",
        "interlink.core.edge", "interlink.core.edge.lmdbstore", "interlink.ext", "interlink.e2ee", "interlink.load", "interlink.load.scenarios",
        "interlink.web"],
    package_dir={"interlink": "bindings", "interlink.core": "core", "interlink.ext": "ext"},
    package_data={"interlink.ext": ["*.pyx", "*.pxd", "*.pxi"], "interlink.load.scenarios": ["*.toml"],
                  "interlink.web": ["*.html", "*.js"]},  # the chat page of make web-demo
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=bool(os.environ.get("INTERLINK_ANNOTATE")),
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    zip_safe=False,
)
