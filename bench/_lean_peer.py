"""The lean load-generating client now lives in the package: ``interlink.leanpeer``.

This module re-exports it so the benchmark scripts beside it (``gateway_load.py``,
``group_load.py``) keep importing ``from _lean_peer import LeanPeer``.
"""

from interlink.leanpeer import *  # noqa: F401,F403
from interlink.leanpeer import AGENT, SUITE_XX_CHACHAPOLY, LeanPeer, _ignore_stanza  # noqa: F401
