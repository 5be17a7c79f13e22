"""Cython hot paths. Each module here has a pure-Python twin in ``interlink.core``; see
``interlink.core._select`` for how one is chosen."""
