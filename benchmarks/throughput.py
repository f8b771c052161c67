"""Throughput benchmark: Roost against mosquitto on loopback, same load, interleaved runs.

Exact command (repository root, Roost installed with ``pip install -e .``)::

    python benchmarks/throughput.py --runs 5 --duration 5

Harness self-check, a second mosquitto standing in for Roost (the ratio should be about 1)::

    python benchmarks/throughput.py --roost-cmd '/usr/sbin/mosquitto -c {mosquitto_conf}'

Scenarios (MQTT 3.1.1, 64-byte payloads, at QoS 0 and QoS 1; subscriptions at the same QoS):

* ``fan-in``:  ``--publishers`` (4) publishers on topics ``bench/in/aa``, ``bench/in/ab``, ...
  to one subscriber on ``bench/in/+``;
* ``fan-out``: one publisher on ``bench/out/aa`` to ``--subscribers`` (50) subscribers on it.

Throughput is PUBLISH frames received by all subscribers per second inside a measurement window
(``--warmup`` seconds after the load starts, lasting ``--duration`` seconds). Publishers send as
fast as the broker takes messages, QoS 1 ones with at most ``--window`` unacknowledged, and all
hold back while subscribers are more than ``--max-outstanding`` messages behind (closed loop: no
backlog grows in the broker). Each run starts a fresh broker on a free loopback port; runs
alternate roost, mosquitto, roost, ... and the table shows medians and the ratio.

During the window the broker's CPU and runnable time (its whole session, from /proc), the load
generator's CPU and the rest of the host's CPU are recorded in % of one core: the broker runnable
~100% of the time with the generator well below it means the broker is the bottleneck. Messages
per broker CPU-second is also shown: it stays steady when other jobs share the machine.

``--roost-cmd`` and ``--mosquitto-cmd`` are command templates: ``{port}`` is the port to listen
on and ``{mosquitto_conf}`` a generated mosquitto configuration for that port. Roost also gets
its listener, limits and data dir through ``ROOST_*`` environment variables (see ``roost_env``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mqttload
import procstat

HOST = mqttload.HOST
PAYLOAD = 64
TOPIC_LEN_SUFFIX = "aa"  # fan-in topics end in two letters per publisher: all one length

DEFAULT_ROOST_CMD = f"{shlex.quote(sys.executable)} -m roost start"
DEFAULT_MOSQUITTO_CMD = "/usr/sbin/mosquitto -c {mosquitto_conf}"

MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
persistence false
sys_interval 0
max_queued_messages 100000
max_queued_bytes 0
max_inflight_messages 1000
max_inflight_bytes 0
log_dest stderr
log_type error
log_type warning
connection_messages false
{extra}"""


class BenchError(RuntimeError):
    pass


def roost_env(port: int, data_dir: Path) -> dict[str, str]:
    """Environment overrides for Roost: TCP on loopback only, no $SYS, queues that do not drop."""
    return {
        "ROOST_LISTENERS__TCP__DEFAULT__BIND": f"{HOST}:{port}",
        "ROOST_LISTENERS__SSL__DEFAULT__ENABLED": "false",
        "ROOST_LISTENERS__WS__DEFAULT__ENABLED": "false",
        "ROOST_LISTENERS__WSS__DEFAULT__ENABLED": "false",
        "ROOST_LISTENERS__QUIC__DEFAULT__ENABLED": "false",
        "ROOST_SYS_TOPICS__ENABLED": "false",
        "ROOST_MQTT__MAX_MQUEUE_LEN": "100000",
        # QoS 0 waits only in memory, held to the window: the same 100,000 as mosquitto's.
        "ROOST_MQTT__MQUEUE_MEMORY_LEN": "100000",
        "ROOST_MQTT__MAX_INFLIGHT": "1000",
        "ROOST_DATA_DIR": str(data_dir),
    }


# --- brokers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Broker:
    """One broker process in its own session; killed with its whole process group on exit."""

    def __init__(self, name: str, template: str, workdir: Path, extra_conf: str = "") -> None:
        self.name = name
        self.port = free_port()
        conf = workdir / f"{name}-{self.port}.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=self.port, host=HOST, extra=extra_conf))
        data_dir = workdir / f"{name}-{self.port}-data"
        data_dir.mkdir()
        self.argv = shlex.split(template.format(port=self.port, mosquitto_conf=conf))
        self.env = {**os.environ, **roost_env(self.port, data_dir)}
        self.log = workdir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Broker:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_accepting(timeout=30.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_accepting(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before accepting on "
                    f"{HOST}:{self.port}: {self.argv}\n{self.log_tail()}"
                )
            try:
                socket.create_connection((HOST, self.port), timeout=1.0).close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"{self.name} not accepting on {HOST}:{self.port} after {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)  # our child leads its own session and group
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.poll()


# --- scenarios and runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    publishers: int
    subscribers: int
    sub_procs: int

    def pub_topic(self, i: int) -> str:
        if self.name == "fan-in":
            return "bench/in/" + chr(97 + i // 26) + chr(97 + i % 26)
        return "bench/out/" + TOPIC_LEN_SUFFIX

    @property
    def sub_filter(self) -> str:
        return "bench/in/+" if self.name == "fan-in" else "bench/out/" + TOPIC_LEN_SUFFIX

    @property
    def copies(self) -> int:
        """How many subscriber deliveries each published message makes."""
        return self.subscribers


@dataclass
class RunResult:
    broker: str
    scenario: str
    qos: int
    run: int
    rate: float = 0.0  # msgs/s received by all subscribers in the window
    broker_cpu: float = 0.0  # % of one core
    gen_cpu: float = 0.0
    other_cpu: float = 0.0  # the rest of the host: other engineers' jobs, our own parent
    delivered: float = 0.0  # received / (published * copies), after the drain
    per_cpu: float = 0.0  # messages per broker CPU-second
    broker_runnable: float = 0.0  # % of the window the broker ran or waited for a CPU
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _quiet_sigint() -> None:
    # Ctrl-C is handled by the parent, which kills the workers and the brokers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker(target: Callable[..., None], *args: Any) -> None:
    _quiet_sigint()
    target(*args)


def _sample(broker_sid: int, gen_pids: list[int]) -> tuple[float, float, float, float]:
    """Broker CPU, broker runnable time, generator CPU, host busy time (all seconds)."""
    broker_pids = procstat.session_pids(broker_sid)
    return (
        procstat.cpu_seconds(broker_pids),
        procstat.runnable_seconds(broker_pids),
        procstat.cpu_seconds(gen_pids),
        procstat.host_busy_seconds(),
    )


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def max_outstanding(args: argparse.Namespace, qos: int) -> int:
    if args.max_outstanding is not None:
        return int(args.max_outstanding)
    # QoS 1 stays within the brokers' inflight window (1000), see README; QoS 0 needs more slack
    # so that the broker never waits for a subscriber that the scheduler is slow to run.
    return 500 if qos else 5000


def run_once(
    broker_name: str, template: str, scen: Scenario, qos: int, run: int, args: argparse.Namespace
) -> RunResult:
    res = RunResult(broker_name, scen.name, qos, run)
    ctx = mp.get_context("fork")
    timing = mqttload.Timing(args.warmup, args.duration, quiet=1.0, drain_max=args.drain)
    payload = b"x" * args.payload
    tag = f"{broker_name[:2]}{os.getpid()}r{run}q{qos}"
    with (
        tempfile.TemporaryDirectory(prefix="roost-bench-") as tmp,
        Broker(
            broker_name, template, Path(tmp), "".join(line + "\n" for line in args.mosquitto_conf)
        ) as broker,
    ):
        per_proc = [len(range(i, scen.subscribers, scen.sub_procs)) for i in range(scen.sub_procs)]
        ctl = mqttload.Control(
            timing=timing,
            ready=ctx.Queue(),
            results=ctx.Queue(),
            go=ctx.Event(),
            start_at=ctx.Value("d", 0.0),
            progress=ctx.RawArray("q", scen.publishers + len(per_proc)),
            done=ctx.RawArray("b", scen.publishers),
            publishers=scen.publishers,
            sub_sizes=per_proc,
            max_outstanding=max_outstanding(args, qos),
        )
        procs: list[Any] = []
        for i in range(scen.publishers):
            pub_args = (i, f"{tag}-pub{i}", broker.port, scen.pub_topic(i), payload, qos)
            procs.append(
                ctx.Process(
                    target=_worker,
                    args=(mqttload.run_publisher, *pub_args, args.window, args.batch, ctl),
                )
            )
        for i, n in enumerate(per_proc):
            # Every publisher's topic has the length of the first one's: one frame size.
            sub_args = (i, f"{tag}-sub{i}", broker.port, n, scen.sub_filter, scen.pub_topic(0))
            procs.append(
                ctx.Process(
                    target=_worker,
                    args=(mqttload.run_subscribers, *sub_args, args.payload, qos, ctl),
                )
            )
        try:
            # Subscribers first, so that every subscription exists before anything is published.
            subs, pubs = procs[scen.publishers :], procs[: scen.publishers]
            for group in (subs, pubs):
                for p in group:
                    p.start()
                for _ in group:
                    status, msg = ctl.ready.get(timeout=mqttload.SETUP_TIMEOUT * 2)
                    if status != "ok":
                        raise BenchError(f"setup failed: {msg}\n{broker.log_tail()}")
            pids = [p.pid for p in procs]
            t_go = time.monotonic() + 0.05
            ctl.start_at.value = t_go
            ctl.go.set()
            t0 = t_go + args.warmup
            t1 = t0 + args.duration
            _sleep_until(t0)
            before = _sample(broker.pid, pids)
            _sleep_until(t1)
            after = _sample(broker.pid, pids)
            done = [ctl.results.get(timeout=args.drain + mqttload.SOCK_TIMEOUT + 10) for _ in procs]
            errors = [d["error"] for d in done if "error" in d]
            if errors:
                raise BenchError(f"worker failed: {errors[0]}\n{broker.log_tail()}")
            for p in procs:
                p.join(5)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(2)
    span = t1 - t0
    b0, r0, g0, h0 = before
    b1, r1, g1, h1 = after
    sub_results = [d for d in done if d["role"] == "sub"]
    received = sum(d["window"] for d in sub_results)
    sent = sum(d["sent"] for d in done if d["role"] == "pub")
    total = sum(d["total"] for d in sub_results)
    res.rate = received / span
    res.broker_cpu = 100 * (b1 - b0) / span
    res.per_cpu = received / (b1 - b0) if b1 > b0 else 0.0
    res.broker_runnable = 100 * (r1 - r0) / span
    res.gen_cpu = 100 * (g1 - g0) / span
    res.other_cpu = max(0.0, 100 * (h1 - h0) / span - res.broker_cpu - res.gen_cpu)
    res.delivered = total / (sent * scen.copies) if sent else 0.0
    res.details = {
        "published": sent,
        "received_total": total,
        "received_window": received,
        "received_after": sum(d["after_window"] for d in sub_results),
        "drain_cut": any(d["drain_cut"] for d in sub_results),
        "unexpected_packets": sum(d["other"] for d in sub_results),
        "slow_path_buffers": sum(d["slow"] for d in sub_results),
        "closed_by_broker": sum(d["closed"] for d in sub_results),
        "sub_recvs": sum(d["recvs"] for d in sub_results),
        "pub_recvs": sum(d["recvs"] for d in done if d["role"] == "pub"),
        "pub_acked": sum(d["acked"] for d in done if d["role"] == "pub"),
        "pub_held": sum(d["held"] for d in done if d["role"] == "pub"),
    }
    return res


# --- reporting -----------------------------------------------------------------------------------


CPU_FIELDS = ("broker_cpu", "broker_runnable", "gen_cpu", "other_cpu")
CPU_HEADS = ("cpu", "runnable", "gen", "other")
TABLE_NOTE = """
msg/s: PUBLISH frames received by all subscribers per second in the window; median of the runs,
  +- half the min-max spread. ratio: median over median.
msg/cpu-s: the same messages per CPU-second the broker used; it barely moves when other jobs
  take CPU away from the broker, so it is the figure to trust on a busy machine.
CPU: the broker's CPU; the time it was runnable (running or waiting for a CPU); the load
  generator's CPU; everything else on the host. The broker runnable near 100% with gen well
  below it means the broker, not the load generator, is the bottleneck; a high 'other' means
  other jobs took CPU from the broker and msg/s understates it."""


def fmt_rate(values: list[float]) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med * 100 if med else 0.0
    return f"{med:,.0f} +-{spread / 2:.0f}%"


def print_run(r: RunResult, verbose: bool = False) -> None:
    if r.error:
        print(f"  {r.scenario:7} qos{r.qos} run {r.run} {r.broker:9} ERROR {r.error}", flush=True)
        return
    warn = ""
    d = r.details
    if d["unexpected_packets"] or d["closed_by_broker"]:
        warn = f"  (!) unexpected={d['unexpected_packets']} closed={d['closed_by_broker']}"
    print(
        f"  {r.scenario:7} qos{r.qos} run {r.run} {r.broker:9} {r.rate:>12,.0f} msg/s"
        f" {r.per_cpu:>10,.0f} msg/cpu-s"
        f"  cpu broker {r.broker_cpu:3.0f}% (runnable {r.broker_runnable:3.0f}%)"
        f" gen {r.gen_cpu:3.0f}% other {r.other_cpu:3.0f}%"
        f"  delivered {100 * r.delivered:.1f}%{warn}",
        flush=True,
    )
    if verbose:
        print("      " + " ".join(f"{k}={v}" for k, v in d.items()), flush=True)


def _med(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def _print_rows(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        cells = zip(row, widths, strict=True)
        print("  ".join(c.rjust(w) if j > 1 else c.ljust(w) for j, (c, w) in enumerate(cells)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_table(results: list[RunResult], brokers: list[str]) -> None:
    """Throughput table (msg/s, msg/cpu-s, ratios), then the CPU table that backs it."""
    pair = len(brokers) == 2
    combos = sorted({(r.scenario, r.qos) for r in results})
    ratio_head = [f"ratio {brokers[0]}/{brokers[1]}"] if pair else []
    rate_rows = [
        ["scenario", "qos"]
        + [f"{b} msg/s" for b in brokers]
        + ratio_head
        + [f"{b} msg/cpu-s" for b in brokers]
        + ratio_head
        + ["runs ok"]
    ]
    cpu_rows = [["scenario", "qos"] + [f"{b} {f}" for b in brokers for f in CPU_HEADS]]
    for scen, qos in combos:
        runs = {
            b: [r for r in results if (r.scenario, r.qos, r.broker) == (scen, qos, b)]
            for b in brokers
        }
        good = {b: [r for r in runs[b] if not r.error] for b in brokers}
        rates = {b: [r.rate for r in good[b]] for b in brokers}
        effs = {b: [r.per_cpu for r in good[b]] for b in brokers}
        row = [scen, str(qos)] + [fmt_rate(rates[b]) for b in brokers]
        row += [_ratio(*(_med(rates[b]) for b in brokers))] if pair else []
        row += [fmt_rate(effs[b]) for b in brokers]
        row += [_ratio(*(_med(effs[b]) for b in brokers))] if pair else []
        row.append(" ".join(f"{len(good[b])}/{len(runs[b])}" for b in brokers))
        rate_rows.append(row)
        cpu_row = [scen, str(qos)]
        for b in brokers:
            for k in CPU_FIELDS:
                v = _med([getattr(r, k) for r in good[b]])
                cpu_row.append("n/a" if v is None else f"{v:.0f}%")
        cpu_rows.append(cpu_row)
    print()
    _print_rows(rate_rows)
    print("\nCPU in the window, % of one core (medians):")
    _print_rows(cpu_rows)
    print(TABLE_NOTE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help="runs per broker and scenario")
    p.add_argument("--duration", type=float, default=5.0, help="measurement window, seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="load before the window, seconds")
    p.add_argument("--drain", type=float, default=5.0, help="max wait for stragglers, seconds")
    p.add_argument("--scenarios", default="fan-in,fan-out", help="comma list: fan-in,fan-out")
    p.add_argument("--qos", default="0,1", help="comma list of QoS levels: 0,1")
    p.add_argument("--brokers", default="roost,mosquitto", help="comma list: roost,mosquitto")
    p.add_argument("--publishers", type=int, default=4, help="fan-in publishers")
    p.add_argument("--subscribers", type=int, default=50, help="fan-out subscribers")
    p.add_argument("--sub-procs", type=int, default=2, help="processes for fan-out subscribers")
    p.add_argument("--payload", type=int, default=PAYLOAD, help="payload bytes")
    p.add_argument("--window", type=int, default=500, help="QoS 1 unacked PUBLISHes per publisher")
    p.add_argument(
        "--batch", type=int, default=100, help="PUBLISHes per send (QoS 1: per window step)"
    )
    p.add_argument(
        "--max-outstanding",
        type=int,
        default=None,
        help="messages per subscriber published but not yet received before publishers wait "
        "(closed loop, no backlog); default 5000 at QoS 0, 500 at QoS 1 (within the brokers' "
        "inflight window of 1000); 0 floods (open loop)",
    )
    p.add_argument("--roost-cmd", default=DEFAULT_ROOST_CMD, help="Roost command template")
    p.add_argument(
        "--mosquitto-cmd", default=DEFAULT_MOSQUITTO_CMD, help="mosquitto command template"
    )
    p.add_argument(
        "--mosquitto-conf",
        action="append",
        default=[],
        metavar="LINE",
        help="extra line for the generated mosquitto configuration (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print per-run counters")
    p.add_argument("--json", type=Path, help="also write every run's result here")
    args = p.parse_args(argv)
    args.scenario_list = [s for s in args.scenarios.split(",") if s]
    args.qos_list = [int(q) for q in args.qos.split(",") if q]
    args.broker_list = [b for b in args.brokers.split(",") if b]
    for s in args.scenario_list:
        if s not in ("fan-in", "fan-out"):
            p.error(f"unknown scenario {s!r}")
    for q in args.qos_list:
        if q not in (0, 1):
            p.error(f"QoS {q} not supported (0 or 1)")
    for b in args.broker_list:
        if b not in ("roost", "mosquitto"):
            p.error(f"unknown broker {b!r}")
    if args.runs < 1 or args.duration <= 0 or args.publishers < 1 or args.subscribers < 1:
        p.error("runs, duration, publishers and subscribers must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM takes the same cleanup path as Ctrl-C: the finally blocks stop workers and brokers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    templates = {"roost": args.roost_cmd, "mosquitto": args.mosquitto_cmd}
    scenarios = {
        "fan-in": Scenario("fan-in", args.publishers, 1, 1),
        "fan-out": Scenario("fan-out", 1, args.subscribers, min(args.sub_procs, args.subscribers)),
    }
    print(
        f"payload {args.payload} B, {args.runs} runs x {args.duration:g}s"
        f" (+{args.warmup:g}s warmup), "
        f"fan-in {args.publishers}->1, fan-out 1->{args.subscribers}, QoS 1 window {args.window}, "
        f"max outstanding {max_outstanding(args, 0)}/{max_outstanding(args, 1)} (QoS 0/1), "
        f"{os.cpu_count()} cores"
    )
    for b in args.broker_list:
        print(f"  {b}: {templates[b]}")
    results: list[RunResult] = []
    interrupted = False
    try:
        for s in args.scenario_list:
            for qos in args.qos_list:
                for run in range(1, args.runs + 1):
                    for b in args.broker_list:
                        try:
                            r = run_once(b, templates[b], scenarios[s], qos, run, args)
                        except (BenchError, mqttload.LoadError, OSError, EOFError) as e:
                            r = RunResult(b, s, qos, run, error=str(e).strip())
                        except Exception as e:  # e.g. queue.Empty: a worker never reported
                            r = RunResult(b, s, qos, run, error=f"{type(e).__name__}: {e}")
                        results.append(r)
                        print_run(r, args.verbose)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; partial results:", file=sys.stderr)
    print_table(results, args.broker_list)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if interrupted:
        return 130
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
