"""What the load tool's test files share: a scenario by name with overrides, and a stand-in
session for the accounting's unit tests (only whether and why a session closed matters there)."""

from __future__ import annotations

from interlink.loadtool import find_scenario, load_scenario


def scenario(name: str, **overrides):
    return load_scenario(find_scenario(name), **overrides)


class StandInSession:
    """Stands in for a device's session in the accounting tests: ``close_reason`` None is a live
    session; ``"client_closed"`` one the tool closed; anything else one the gateway ended or lost."""

    def __init__(self, reason):
        self.close_reason = reason

    @property
    def closed(self):
        return self.close_reason is not None
