"""Flapping detection: a client id that reconnects too often is banned for a while."""

from __future__ import annotations

from roost.broker.flapping import FlappingDetector
from roost.config import FlappingSettings
from tests.clients import RawClient
from tests.http import Api


def test_flapping_client_is_banned(make_broker):
    """The ban's end and the window are checked on a ManualClock in tests/test_timed.py."""
    b = make_broker({"flapping_detect": {"enabled": True, "max_count": 5, "window_time": 10,
                                         "ban_time": 60}})  # fmt: skip
    for _ in range(5):
        raw = RawClient(b.port)
        assert raw.connect("flapper").reason_code == 0
        raw.close()
    other = RawClient(b.port)
    assert other.connect("steady").reason_code == 0  # others are not affected
    raw = RawClient(b.port)
    assert raw.connect("flapper").reason_code == 0x8A  # the sixth within the window
    assert raw.closed()
    b.wait_api()
    bans = Api(b.api_url, key=b.api_key).ok("GET", "/api/v1/banned")["data"]
    assert [(x["as"], x["who"], x["reason"]) for x in bans] == [("clientid", "flapper", "flapping")]
    other.close()


def test_detector_window_and_disabled():
    now = [0.0]
    cfg = FlappingSettings(enabled=True, max_count=3, window_time=10, ban_time=60)
    d = FlappingDetector(lambda: cfg, lambda: now[0])
    assert [d.flapping("c") for _ in range(3)] == [False, False, False]
    now[0] = 11.0  # the first three fell out of the window
    assert [d.flapping("c") for _ in range(3)] == [False, False, False]
    assert d.flapping("c") is True
    now[0] = 30.0
    d.purge()
    assert len(d) == 0
    off = FlappingSettings(enabled=False, max_count=1)
    d2 = FlappingDetector(lambda: off, lambda: now[0])
    assert not any(d2.flapping("c") for _ in range(10))
