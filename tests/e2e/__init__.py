"""The whole stack over TCP on 127.0.0.1: a real gateway, real OpenID issuers, real LMDB and the
``interlink.Client`` SDK, one module per subject."""
