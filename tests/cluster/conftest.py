from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport() -> Iterator[None]:
    """Collect garbage before a report is made, and let none be collected while it is.

    On CPython 3.11.7 a collection while pytest parses source for a traceback (the grpc
    objects a failed etcd test leaves behind have finalizers) raises "SystemError: AST
    constructor recursion depth mismatch" (CPython gh-106905), which turns one failing test
    into an INTERNALERROR that ends the whole session.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
