"""/metrics: valid Prometheus text (parsed by prometheus-client's parser) that moves with load."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.brokerproc import BrokerProcess
from tests.clients import PahoClient
from tests.http import Api


def _scrape(api: Api) -> dict[str, dict[tuple, float]]:
    code, text = api.get("/metrics")
    assert code == 200
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_cover_the_issue_list_and_count_traffic():
    with BrokerProcess({"sys_topics": {"enabled": False}}) as b:
        b.wait_api()
        api = Api(b.api_url)  # public by default: Prometheus scrapes without credentials
        before = _scrape(api)
        for name in (
            "roost_connections",
            "roost_listener_connections",
            "roost_listener_up",
            "roost_listener_accept_errors_total",
            "roost_sessions",
            "roost_subscriptions",
            "roost_messages_received_total",
            "roost_messages_sent_total",
            "roost_bytes_received_total",
            "roost_bytes_sent_total",
            "roost_messages_dropped_total",
            "roost_retained_messages",
            "roost_inflight_messages",
            "roost_queued_messages",
            "roost_auth_failures_total",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "roost_event_loop_lag_seconds",
        ):
            assert name in before, name
        sub = PahoClient(b.port, "m-sub")
        sub.connect()
        sub.subscribe("m/#", 1)
        pub = PahoClient(b.port, "m-pub")
        pub.connect()
        for i in range(3):
            pub.publish("m/t", f"{i}".encode(), 1)
        pub.publish("nobody/home", b"x", 0)
        pub.publish("m/r", b"keep", 0, retain=True)
        sub.recv_all(4)
        after = _scrape(api)
        assert after["roost_connections"][()] == 2
        assert after["roost_listener_connections"][(("listener", "tcp:default"),)] == 2
        assert after["roost_listener_up"][(("listener", "tcp:default"),)] == 1
        assert after["roost_sessions"][(("state", "connected"),)] == 2
        assert after["roost_subscriptions"][()] == 1
        assert after["roost_retained_messages"][()] == 1
        recv = after["roost_messages_received_total"]
        assert recv[(("qos", "1"),)] == 3 and recv[(("qos", "0"),)] == 2
        assert after["roost_messages_sent_total"][(("qos", "1"),)] == 3
        dropped = after["roost_messages_dropped_total"][(("reason", "no_subscribers"),)]
        assert dropped == 1
        assert after["roost_bytes_received_total"][()] > before["roost_bytes_received_total"][()]
        assert after["process_resident_memory_bytes"][()] > 1e6
        assert 0 <= after["roost_event_loop_lag_seconds"][()] < 1
        sub.disconnect()
        pub.disconnect()


def test_metrics_can_require_credentials():
    with BrokerProcess({"api": {"public_metrics": False}}) as b:
        b.wait_api()
        assert Api(b.api_url).get("/metrics")[0] == 401
        assert Api(b.api_url, key=b.api_key).get("/metrics")[0] == 200
