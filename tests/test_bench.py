"""`roost bench`: each subcommand against real brokers (Roost and mosquitto) on loopback.

Every bench runs as a real `python -m roost bench` subprocess with a bounded duration (or a
limit, or Ctrl-C), and is killed at the end of its test whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.bench.histogram import Histogram
from roost.bench.report import parse_uptime, uptime
from roost.bench.stats import Sequences, Stats
from roost.bench.topics import client_id, expand
from tests.brokerproc import BrokerProcess, free_port
from tests.certs import TestPki

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# emqtt-bench's per-second line, and ours for latency and the broker.
COUNTER = re.compile(r"^((?:\d+h)?(?:\d+m)?\d+s) (\w+) total=(\d+) rate=(\d+\.\d\d)/sec$")
LATENCY = re.compile(r"^((?:\d+h)?(?:\d+m)?\d+s) publish_latency avg=[\d.]+ms p50=[\d.]+ms "
                     r"p90=[\d.]+ms p99=[\d.]+ms p999=[\d.]+ms"
                     r"( max=[\d.]+ms samples=\d+)?$")  # fmt: skip
BROKER = re.compile(r"^((?:\d+h)?(?:\d+m)?\d+s) broker (connections=\d+.*|unreachable .*)$")
OTHER = re.compile(r"^(--- summary after \S+ \(.+\) ---|\S+ bench cpu=[\d.]+% .*)$")


def tag() -> str:
    return uuid.uuid4().hex[:8]


class Bench:
    """A `roost bench` subprocess whose output lines are collected as they come."""

    def __init__(self, *args: object, tmp: Path) -> None:
        self.json_path = tmp / f"bench-{tag()}.jsonl"
        cmd = [sys.executable, "-m", "roost", "bench", *map(str, args), "--json",
               str(self.json_path)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        pipes = ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        self._threads = [threading.Thread(target=self._read, args=(s, d), daemon=True)
                         for s, d in pipes]  # fmt: skip
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 15.0, stderr: bool = False) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        lines = self.err if stderr else self.out
        while time.monotonic() < deadline:
            for line in list(lines):
                if rx.search(line):
                    return line
            if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text()}")

    def wait(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        for t in self._threads:
            t.join(2)
        return rc

    def interrupt(self, timeout: float = 15.0) -> int:
        """Ctrl-C, as a user ends a run."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def text(self) -> str:
        return "\n".join(self.out) + "\n--- stderr ---\n" + "\n".join(self.err)

    @property
    def summary(self) -> dict:
        records = [json.loads(x) for x in self.json_path.read_text().splitlines()]
        assert records[-1]["type"] == "summary", records[-1]
        return records[-1]

    def counter(self, name: str) -> int:
        return self.summary["counters"][name]


@pytest.fixture
def run(tmp_path: Path) -> Iterator:
    started: list[Bench] = []

    def start(*args: object) -> Bench:
        b = Bench(*args, tmp=tmp_path)
        started.append(b)
        return b

    yield start
    for b in started:
        b.kill()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("bench-pki"))


@pytest.fixture(scope="module")
def roost(pki: TestPki) -> Iterator[BrokerProcess]:
    """One Roost with TCP, mutual-TLS, WebSocket and QUIC listeners and the management API."""
    quic, ssl_port, ws = free_port(), free_port(), free_port()
    cert, key = pki.issue("localhost", server=True)
    tls = {"certfile": cert, "keyfile": key, "cacertfile": str(pki.ca), "verify": "verify_peer",
           "fail_if_no_peer_cert": True}  # fmt: skip
    cfg = {
        "listeners": {
            "quic": {"default": {"enabled": True, "bind": f"127.0.0.1:{quic}"}},
            "ssl": {"default": {"enabled": True, "bind": f"127.0.0.1:{ssl_port}",
                                "ssl_options": tls}},
            "ws": {"default": {"enabled": True, "bind": f"127.0.0.1:{ws}"}},
        },
        "log": {"level": "warning"},
    }  # fmt: skip
    with BrokerProcess(cfg) as b:
        b.wait_api()
        b.quic, b.ssl, b.ws = quic, ssl_port, ws  # type: ignore[attr-defined]
        yield b


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    d = tmp_path_factory.mktemp("mosquitto")
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\nsys_interval 1\n")  # fmt: skip
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def broker_port(request: pytest.FixtureRequest, which: str) -> tuple[int, str | None, str | None]:
    """(MQTT port, API URL, API key) of the named broker fixture."""
    if which == "roost":
        b = request.getfixturevalue("roost")
        return b.port, b.api_url, b.api_key
    return request.getfixturevalue("mosquitto"), None, None


def mosquitto_counter(port: int, name: str) -> int:
    """One of mosquitto's $SYS counters. The retained value can be old (mosquitto does not
    always refresh it), so take the next one it publishes (sys_interval 1)."""
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-C", "2",
                          "-W", "5", "-t", f"$SYS/broker/{name}"],
                         capture_output=True, text=True, timeout=10)  # fmt: skip
    return int(out.stdout.split()[-1])


def check_format(b: Bench) -> None:
    for line in b.out:
        assert COUNTER.match(line) or LATENCY.match(line) or BROKER.match(line) or \
            OTHER.match(line), f"unexpected output line {line!r}"  # fmt: skip


def ticks(b: Bench, name: str) -> list[tuple[int, int, float]]:
    """(uptime s, total, rate) of every per-second line for counter ``name``."""
    out = []
    for line in b.out:
        if line.startswith("---"):
            break  # the summary repeats the totals
        m = COUNTER.match(line)
        if m and m.group(2) == name:
            out.append((parse_uptime(m.group(1)), int(m.group(3)), float(m.group(4))))
    return out


# ---------------------------------------------------------------------------- pure parts


def test_uptime_histogram_placeholders_and_ids():
    assert [uptime(s) for s in (0, 5, 65, 3605)] == ["0s", "5s", "1m5s", "1h0m5s"]
    assert parse_uptime("1m5s") == 65
    h = Histogram()
    for v in range(1, 10001):
        h.record(v)
    assert h.count == 10000 and h.mean == pytest.approx(5000.5)
    for p, want in ((50, 5000), (90, 9000), (99, 9900), (99.9, 9990)):
        assert h.percentile(p) == pytest.approx(want, rel=0.02)  # two significant digits
    merged = Histogram()
    merged.merge_sparse(json.loads(json.dumps(h.to_sparse())))  # as it travels between workers
    assert merged.percentile(99) == h.percentile(99) and merged.max == 10000
    assert expand("a/%i/%c/%u/x%i", 7, "cid", "bob") == "a/7/cid/bob/x%i"  # whole levels only
    assert expand("t/%s", 1, "c", None, msg_seq=42) == "t/42"
    assert all(expand("r/%rand_3", 1, "c", None) in ("r/1", "r/2", "r/3") for _ in range(50))
    assert client_id("pub", 3, "dev", False) == "dev_bench_pub_3"
    assert client_id("sub", 3, "dev", True) == "dev3"
    assert client_id("conn", 3, None, False).split("_bench_conn_3_")[1].isdigit()


def test_sequences_tell_loss_from_reordering():
    seqs, stats = Sequences(), Stats()
    for seq in (5, 6, 8, 7, 7, 10):  # joins at 5; 7 late (QUIC streams); 7 again; 9 missing
        seqs.check(1, seq, stats)
    assert (stats.lost, stats.dup) == (0, 1)
    seqs.settle(stats)  # the run ends: 9 never came
    assert (stats.lost, stats.dup) == (1, 1)
    for seq in range(11, 11 + 2 * Sequences.REORDER + 2, 2):  # every other one missing
        seqs.check(1, seq, stats)
    assert stats.lost > 1  # far enough behind the newest: lost without waiting for the end


# ---------------------------------------------------------------------------- pub and sub


@pytest.mark.parametrize("which", ["roost", "mosquitto"])
def test_pub_sub_counts_match_the_broker(request, run, which):
    """Subscribers get every message of the publishers (no loss, no duplicate); the publisher
    stops at -L; Ctrl-C gives a summary; the broker counted what the bench did."""
    port, api, key = broker_port(request, which)
    t = tag()
    if which == "mosquitto":
        before = [mosquitto_counter(port, f"publish/messages/{d}") for d in ("received", "sent")]
    sub = run("sub", "-h", "127.0.0.1", "-p", port, "-c", 3, "-i", 0, "-t", f"cnt/{t}/#",
              "-q", 1)  # fmt: skip
    sub.wait_for(r" sub total=3 ")
    extra = ["--api", api, "--api-key", key] if api else []
    pub = run("pub", "-h", "127.0.0.1", "-p", port, "-c", 2, "-i", 0, "-I", 5, "-q", 1,
              "-F", 5, "-L", 300, "-t", f"cnt/{t}/%i", *extra)  # fmt: skip
    assert pub.wait(30) == 0, pub.text()
    assert pub.summary["ended"] == "publish limit reached"
    assert pub.counter("pub") == 300 and pub.counter("pub_fail") == 0
    deadline = time.monotonic() + 10
    while not any(COUNTER.match(x) and " recv total=900 " in x for x in sub.out):
        assert time.monotonic() < deadline, sub.text()
        time.sleep(0.1)
    assert sub.interrupt() == 0, sub.text()
    s = sub.summary
    assert s["ended"] == "interrupted"
    assert (s["counters"]["recv"], s["counters"]["lost"], s["counters"]["dup"]) == (900, 0, 0)
    assert s["latency"]["count"] == 900 and 0 < s["latency"]["p50"] <= s["latency"]["p999"]
    assert "--- summary after" in "\n".join(sub.out)
    if api:
        # The broker's own counters over the publisher's run: 300 in.
        assert pub.summary["broker"]["received"] == 300, pub.summary["broker"]
        assert any(BROKER.match(x) for x in pub.out)
    else:
        after = [mosquitto_counter(port, f"publish/messages/{d}") for d in ("received", "sent")]
        received, sent = (a - b for a, b in zip(after, before, strict=True))
        # "sent" also counts the $SYS messages delivered to the readers of these counters.
        assert received == 300 and 900 <= sent <= 910, (received, sent)
    for b in (sub, pub):
        check_format(b)
    assert ticks(sub, "recv")[-1][1] == 900


def test_placeholders_expand(run, mosquitto):
    t = tag()
    mon = subprocess.Popen(["mosquitto_sub", "-p", str(mosquitto), "-h", "127.0.0.1",
                            "-F", "%t", "-t", f"ph/{t}/#", "-C", "6", "-W", "20"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        sub = run("sub", "-h", "127.0.0.1", "-p", mosquitto, "-c", 2, "-n", 20, "-i", 0,
                  "--prefix", "s", "--shortids", "-t", f"ph2/{t}/%i",
                  "-t", f"ph2/{t}/%c/x")  # fmt: skip
        sub.wait_for(r" sub total=2 ")
        time.sleep(0.3)  # mosquitto_sub is subscribed by now
        pub = run("pub", "-h", "127.0.0.1", "-p", mosquitto, "-c", 2, "-n", 10, "-i", 0,
                  "-I", 50, "-L", 6, "--prefix", "ph", "-u", "alice",
                  "-t", f"ph/{t}/%i/%c/%u/%s/%rand_3")  # fmt: skip
        assert pub.wait(20) == 0, pub.text()
        topics = [line.split(" ", 1)[0] for line in mon.communicate(timeout=20)[0].splitlines()]
    finally:
        mon.kill()
    assert len(topics) == 6
    for topic in topics:
        _, _, i, c, u, s, r = topic.split("/")
        assert i in ("11", "12") and c == f"ph_bench_pub_{i}" and u == "alice"
        assert 1 <= int(s) <= 6 and r in ("1", "2", "3")  # -L is shared by both clients
    # Subscription placeholders: %i and %c of clients 21 and 22 ("s21", "s22").
    for topic in (f"ph2/{t}/21", f"ph2/{t}/s22/x", f"ph2/{t}/23"):
        subprocess.run(["mosquitto_pub", "-p", str(mosquitto), "-h", "127.0.0.1", "-t", topic,
                        "-m", "x", "-q", "1"], check=True, timeout=10)  # fmt: skip
    sub.wait_for(r" recv total=2 ")
    sub.interrupt()
    assert sub.counter("recv") == 2  # nothing for ph2/.../23: no such client


@pytest.mark.parametrize("version", [3, 5])
def test_versions_and_websocket_and_workers(roost, run, version):
    """-V 3 and -V 5 end to end; subscribers over WebSocket in two worker processes."""
    t = tag()
    sub = run("sub", "--ws", "-h", "127.0.0.1", "-p", roost.ws, "-V", version, "-j", 2,
              "-c", 4, "-i", 0, "-t", f"v/{t}/#", "-q", 2, "--duration", 6)  # fmt: skip
    sub.wait_for(r" sub total=4 ")
    pub = run("pub", "-h", "127.0.0.1", "-p", roost.port, "-V", version, "-c", 2, "-i", 0,
              "-I", 5, "-q", 2, "-F", 3, "-L", 100, "-t", f"v/{t}/%i")  # fmt: skip
    assert pub.wait(20) == 0, pub.text()
    assert pub.counter("pub") == 100
    sub.wait_for(r" recv total=400 ")
    sub.interrupt()
    c = sub.summary["counters"]
    assert (c["recv"], c["lost"], c["dup"], c["connect_succ"]) == (400, 0, 0, 4)


def test_tls_with_a_test_ca(roost, pki, run):
    """-S with the test CA and a client certificate (the listener requires one); without a
    certificate the broker refuses the clients and the bench says so."""
    cert, key = pki.issue("bench-client")
    t = tag()
    sub = run("sub", "-h", "127.0.0.1", "-p", roost.port, "-c", 1, "-t", f"tls/{t}",
              "--duration", 8)  # fmt: skip
    sub.wait_for(r" sub total=1 ")
    pub = run("pub", "-S", "-h", "127.0.0.1", "-p", roost.ssl, "--cafile", pki.ca,
              "--certfile", cert, "--keyfile", key, "-c", 2, "-i", 0, "-I", 10, "-L", 40,
              "-t", f"tls/{t}")  # fmt: skip
    refused = run("conn", "-S", "-h", "127.0.0.1", "-p", roost.ssl, "-c", 2, "-i", 0,
                  "--duration", 5)  # fmt: skip
    assert pub.wait(20) == 0, pub.text()
    assert pub.counter("pub") == 40
    sub.wait_for(r" recv total=40 ")
    sub.interrupt()
    assert sub.counter("recv") == 40 and sub.counter("lost") == 0
    assert refused.wait(20) == 1, refused.text()
    assert refused.counter("connect_fail") == 2 and refused.counter("connect_succ") == 0
    assert any("connect error" in x for x in refused.err)


def test_limit_stops_at_the_limit_and_the_broker_view(roost, run):
    """-L with many clients and a window stops at exactly the limit; --api shows the broker's
    connections and counters next to ours."""
    # 5 clients x 20 msg/s: 137 messages take over a second, so a tick shows the broker.
    pub = run("pub", "-h", "127.0.0.1", "-p", roost.port, "-c", 5, "-i", 0, "-I", 50, "-q", 1,
              "-F", 10, "-L", 137, "-t", f"lim/{tag()}/%i", "--api", roost.api_url,
              "--api-key", roost.api_key)  # fmt: skip
    assert pub.wait(20) == 0, pub.text()
    s = pub.summary
    assert s["ended"] == "publish limit reached"
    assert s["counters"]["pub"] == 137 and s["broker"]["received"] == 137
    line = pub.wait_for(r" broker connections=\d+ ")
    assert int(re.search(r"connections=(\d+)", line).group(1)) >= 5  # type: ignore[union-attr]
    check_format(pub)


# ---------------------------------------------------------------------------- conn


@pytest.mark.parametrize("which", ["roost", "mosquitto"])
def test_conn_rate_bounds_the_storm(request, run, which):
    """-R 25: about 25 connections a second, not all 40 at once; all held to the end, as the
    broker saw (Roost's API, mosquitto's $SYS)."""
    port, api, key = broker_port(request, which)
    extra = ["--api", api, "--api-key", key] if api else []
    conn = run("conn", "-h", "127.0.0.1", "-p", port, "-c", 40, "-R", 25,
               "--prefix", f"r{tag()}", "--duration", 4.5, *extra)  # fmt: skip
    if not api:
        conn.wait_for(r" connect_succ total=40 ", timeout=10)
        assert mosquitto_counter(port, "clients/connected") >= 40
    assert conn.wait(20) == 0, conn.text()
    first = ticks(conn, "connect_succ")[0]
    assert first[0] == 1 and first[1] <= 30, conn.text()  # 1 s at 25/s (+ the first)
    assert conn.counter("connect_succ") == 40
    if api:  # the broker saw them all at once before the end
        assert any(re.search(r"broker connections=([4-9]\d)", x) for x in conn.out), \
            conn.text()  # fmt: skip


def test_keepalive_pings_and_persistent_sessions(roost, run):
    """-k 1: the broker drops a client silent for 1.5 s, so surviving 3 s means PINGREQs went
    out. -C false -x 60: the session outlives the connection (the broker still lists it)."""
    t = tag()
    conn = run("conn", "-h", "127.0.0.1", "-p", roost.port, "-c", 2, "-i", 0, "-k", 1,
               "-C", "false", "-x", 60, "--prefix", f"ka{t}", "--shortids",
               "--duration", 3)  # fmt: skip
    assert conn.wait(20) == 0, conn.text()
    assert conn.counter("connect_succ") == 2 and conn.counter("conn_lost") == 0, conn.text()
    import urllib.request

    req = urllib.request.Request(f"{roost.api_url}/api/v1/clients/ka{t}1",
                                 headers={"Authorization": f"Bearer {roost.api_key}"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.loads(resp.read())["connected"] is False  # offline, session kept


def test_json_alone_replaces_the_text(roost):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "roost", "bench", "conn", "-h", "127.0.0.1", "-p", str(roost.port),
           "-c", "2", "-i", "0", "--duration", "1.5", "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["type"] for r in records] == ["tick", "summary"], out.stdout
    assert records[0]["counters"]["connect_succ"]["total"] == 2
    assert records[1]["counters"]["connect_succ"] == 2 and records[1]["ended"] == "duration reached"


def test_broker_going_away_is_reported_and_rejoined(run, tmp_path):
    port = free_port()
    b = BrokerProcess({"log": {"level": "warning"}}, port=port).start()
    try:
        stay = run("sub", "-h", "127.0.0.1", "-p", port, "-c", 3, "-i", 0, "-t", "away/x",
                   "--reconnect", 20, "--duration", 20)  # fmt: skip
        gone = run("conn", "-h", "127.0.0.1", "-p", port, "-c", 2, "-i", 0, "--duration", 20)
        stay.wait_for(r" sub total=3 ")
        gone.wait_for(r" connect_succ total=2 ")
        b.kill()
        # Without --reconnect the bench reports the loss and ends: no client left.
        assert gone.wait(15) == 1, gone.text()
        assert gone.counter("conn_lost") == 2
        assert any("connection lost" in x for x in gone.err)
        assert gone.summary["ended"] == "no client left"
        stay.wait_for(r" conn_lost total=3 ")
        b.restart()
        stay.wait_for(r" reconnect_succ total=3 ", timeout=20)
        stay.wait_for(r" sub total=6 ")  # subscribed again
        assert stay.interrupt() == 0
        assert stay.counter("connect_succ") == 6
    finally:
        b.stop()
        b.tmp.cleanup()


# ---------------------------------------------------------------------------- QUIC


def test_quic_migration_loses_nothing_and_reconnects_in_0rtt(roost, run):
    """The seeds' demo in small: QUIC subscribers and a publisher (on two data streams), every
    client moving to a new UDP port every 0.25 s: at least 10 migrations each, no loss. Then
    a kicked client comes back in 0-RTT with its session ticket."""
    t = tag()
    sub = run("sub", "--quic", "-h", "127.0.0.1", "-p", roost.quic, "-c", 2, "-i", 0,
              "-t", f"quic/{t}", "-q", 1, "--migrate-every", 0.25, "--prefix", f"qs{t}",
              "--shortids", "--reconnect", 3, "--duration", 15)  # fmt: skip
    sub.wait_for(r" sub total=2 ")
    pub = run("pub", "--quic", "--quic-streams", 2, "-h", "127.0.0.1", "-p", roost.quic,
              "-c", 1, "-I", 10, "-L", 300, "-q", 1, "-F", 4, "-t", f"quic/{t}",
              "--migrate-every", 0.25)  # fmt: skip
    assert pub.wait(30) == 0, pub.text()
    assert pub.counter("pub") == 300 and pub.counter("migrate") >= 10, pub.text()
    sub.wait_for(r" recv total=600 ")
    # Kick one subscriber: it reconnects with its ticket, CONNECT in 0-RTT data.
    import urllib.request

    req = urllib.request.Request(f"{roost.api_url}/api/v1/clients/qs{t}1", method="DELETE",
                                 headers={"Authorization": f"Bearer {roost.api_key}"})  # fmt: skip
    urllib.request.urlopen(req, timeout=5).close()
    sub.wait_for(r" reconnect_succ total=1 ")
    sub.interrupt()
    c = sub.summary["counters"]
    assert (c["recv"], c["lost"], c["dup"]) == (600, 0, 0), sub.text()
    assert c["migrate"] >= 20 and c["migrate_fail"] == 0
    assert c["conn_lost"] == 1 and c["connect_0rtt"] == 1, sub.text()
    check_format(sub)
