"""Build script: maps the three source folders onto one import package and compiles ext/.

    interlink       <- bindings/   (public API, CLI, SDK)
    interlink.core  <- core/       (engine; pure-Python twins of every native module)
    interlink.ext   <- ext/        (Cython hot paths)
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE_MODULES = ["_framing", "_cipher", "_fanout", "_mailbox", "_stanza"]

extensions = [
    Extension(f"interlink.ext.{name}", [os.path.join("ext", f"{name}.pyx")])
    for name in NATIVE_MODULES
]

setup(
    packages=["interlink", "interlink.core", "interlink.core.auth", "interlink.core.lmdbstore", "interlink.ext", "interlink.e2ee", "interlink.load", "interlink.load.scenarios"],
    package_dir={"interlink": "bindings", "interlink.core": "core", "interlink.ext": "ext"},
    package_data={"interlink.ext": ["*.pyx", "*.pxd"], "interlink.load.scenarios": ["*.toml"]},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=bool(os.environ.get("INTERLINK_ANNOTATE")),
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    zip_safe=False,
)
