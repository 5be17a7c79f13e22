"""``make proxy-check``: async tests on uvloop, as in tests/."""


def pytest_asyncio_loop_factories(config, item):
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
