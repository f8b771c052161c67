"""Helpers for listener tests: wait for a listener's log line, TLS client contexts."""

from __future__ import annotations

import ssl
import time

from tests.brokerproc import BrokerProcess


def wait_listening(b: BrokerProcess, label: str, timeout: float = 10.0) -> None:
    """Block until the broker logs that listener ``label`` (e.g. ``ssl:default``) is up."""
    needle = f"listening for MQTT on {label} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in b.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{label} not listening within {timeout}s:\n{b.log()}")


def client_context(
    cafile: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx
