"""``interlink.load``: the load tool (``interlink load``, ``interlink load-merge``) and what the
gateway benchmarks in ``bench/`` drive traffic with. It imports the public API; the API never
imports it, and it needs the ``load`` extra (``pip install 'interlink[load]'``), checked here so
that a missing dependency is named with the extra that brings it.

Modules, each depending only on those above it: ``procstat``, ``schedule``, ``peer`` (the lean
client), ``e2ee``, ``scenario``, ``accounting``, ``child`` (the gateway child process), ``target``
(the gateway a run drives), ``report``, ``progress``, ``runner``, ``chat``, ``group``, ``stress``,
``media`` (blobs beside the chat), ``nats`` (the peer), ``view`` (merged reports, plots), ``cli``.
"""

from __future__ import annotations

import importlib

from interlink.core.errors import ConfigError

EXTRA_MODULES = {"hdrh": "hdrhistogram", "rich": "rich"}  # module -> the distribution of the load extra that has it


def _require_extra() -> None:
    for module, distribution in EXTRA_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"interlink load needs the load extra ({distribution} is missing): "
                              "pip install 'interlink[load]'") from None


_require_extra()
