from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.brokerproc import BrokerProcess

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(call: pytest.CallInfo[None]) -> Iterator[None]:
    """No garbage collection while pytest renders a failure.

    On CPython 3.11.7 a collection while pytest parses source for a traceback raises
    "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905) and the one
    failing test becomes an INTERNALERROR that ends the session; the grpc objects a failed
    etcd test leaves behind, with their finalizers, made it happen every time.
    """
    if call.excinfo is None:
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerProcess]:
    """One shared broker on its defaults (plus a refusable test topic), for most tests."""
    cfg = {
        "authorization": {
            "rules": [{"permission": "deny", "action": "subscribe", "topics": ["test/nosubscribe"]}]
        },
        "sys_topics": {"interval": 1},
    }
    with BrokerProcess(cfg) as b:
        yield b


@pytest.fixture
def make_broker() -> Iterator[type[BrokerProcess]]:
    """Start extra brokers with their own config; all are stopped after the test."""
    started: list[BrokerProcess] = []

    def factory(config: dict | None = None) -> BrokerProcess:
        b = BrokerProcess(config).start()
        started.append(b)
        return b

    yield factory  # type: ignore[misc]
    for b in started:
        b.stop()
        b.tmp.cleanup()
