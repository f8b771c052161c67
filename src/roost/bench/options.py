"""``roost bench conn | sub | pub``: emqtt-bench's flags and defaults, plus a few of our own.

``-h`` is the host, as in emqtt-bench; ``--help`` prints the help.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_PORTS = {"tcp": 1883, "ssl": 8883, "ws": 8083, "wss": 8084, "quic": 14567}


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _flag(p: argparse.ArgumentParser, *names: str, default: bool = False, help: str) -> None:
    """A boolean that works alone (``-S``) or with a value (``--ssl true``, ``-C false``)."""
    p.add_argument(*names, nargs="?", const=True, default=default, type=parse_bool,
                   metavar="BOOL", help=f"{help} [default: {str(default).lower()}]")  # fmt: skip


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("-h", "--host", default="localhost", help="broker host [default: localhost]")
    p.add_argument("-p", "--port", type=int, default=None,
                   help="broker port [default: 1883, 8883 with -S, 8083 with --ws, "
                        "14567 with --quic]")  # fmt: skip
    p.add_argument("-V", "--version", type=int, choices=(3, 4, 5), default=5,
                   help="MQTT version: 3 (3.1), 4 (3.1.1), 5 [default: 5]")  # fmt: skip
    p.add_argument("-c", "--count", type=int, default=200, help="clients [default: 200]")
    p.add_argument("-n", "--startnumber", type=int, default=0,
                   help="first client sequence number is this + 1 [default: 0]")  # fmt: skip
    p.add_argument("-i", "--interval", type=float, default=10.0,
                   help="ms between connection starts [default: 10]")  # fmt: skip
    p.add_argument("-R", "--connrate", type=float, default=0.0,
                   help="connections (and reconnections) per second; overrides -i "
                        "[default: 0, unset]")  # fmt: skip
    p.add_argument("--prefix", default=None, help="client id prefix")
    p.add_argument("--shortids", action="store_true", help="client ids are <prefix><seq>")
    p.add_argument("--ifaddr", default="",
                   help="local address(es) to connect from, comma-separated: clients take "
                        "them in turn")  # fmt: skip
    _flag(p, "-S", "--ssl", help="TLS")
    p.add_argument("--certfile", help="client certificate, if the broker asks for one")
    p.add_argument("--keyfile", help="client certificate's private key")
    p.add_argument("--cafile",
                   help="verify the broker's certificate against this CA (default: no check, "
                        "as emqtt-bench)")  # fmt: skip
    _flag(p, "--quic", help="MQTT over QUIC (ALPN mqtt)")
    _flag(p, "--ws", help="MQTT over WebSocket (wss with -S)")
    p.add_argument("--ws-path", default="/mqtt", help="WebSocket path [default: /mqtt]")
    p.add_argument("-u", "--username", default=None, help="username")
    p.add_argument("-P", "--password", default=None, help="password")
    p.add_argument("-k", "--keepalive", type=int, default=300,
                   help="keepalive seconds [default: 300]")  # fmt: skip
    _flag(p, "-C", "--clean", default=True, help="clean start")
    p.add_argument("-x", "--session-expiry", type=int, default=0,
                   help="MQTT 5 session expiry interval, seconds [default: 0]")  # fmt: skip
    p.add_argument("--reconnect", type=int, default=0,
                   help="reconnect a lost client up to this many times in a row "
                        "[default: 0, never]")  # fmt: skip
    q = p.add_argument_group("QUIC")
    q.add_argument("--quic-streams", type=int, default=0,
                   help="data streams per client besides the control stream: publishes and "
                        "subscriptions go on them in turn [default: 0]")  # fmt: skip
    q.add_argument("--migrate-every", type=float, default=0.0, metavar="SECONDS",
                   help="rebind each client's UDP socket to a new local port this often "
                        "(address migration) [default: 0, never]")  # fmt: skip
    r = p.add_argument_group("running and output")
    r.add_argument("-j", "--workers", type=int, default=1,
                   help="processes to spread the clients over [default: 1]")  # fmt: skip
    r.add_argument("--duration", type=float, default=0.0,
                   help="stop after this many seconds [default: 0, on Ctrl-C]")  # fmt: skip
    r.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="the same figures as JSON lines: to FILE, or alone instead of the text "
                        "on stdout")  # fmt: skip
    r.add_argument("--api", default=None, metavar="URL",
                   help="broker management URL (http://host:18083): sample its stats "
                        "every second and print them too")  # fmt: skip
    r.add_argument("--api-key", default=None, help="bearer key for --api")
    r.add_argument("--max-connecting", type=int, default=128, metavar="N",
                   help="connections being set up at once per process, whatever -i and -R say: "
                        "past a broker's accept queue (mosquitto's holds 100) SYNs are dropped "
                        "and retried a second later [default: 128]")  # fmt: skip
    r.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for a CONNACK [default: 30]")  # fmt: skip
    r.add_argument("--quiet", action="store_true", help="only the final summary")


def build_parser(prog: str = "roost bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="An emqtt-bench compatible MQTT load generator.", add_help=False
    )
    parser.add_argument("--help", action="help", help="show this help and exit")
    add_subcommands(parser.add_subparsers(dest="bench_command", required=True))
    return parser


def add_subcommands(sub: Any) -> None:
    kw = {"add_help": False, "formatter_class": argparse.RawDescriptionHelpFormatter}
    conn = sub.add_parser("conn", help="open connections and hold them", **kw)
    _common(conn)
    s = sub.add_parser("sub", help="subscribe and count what arrives", **kw)
    _common(s)
    s.add_argument("-t", "--topic", action="append", required=True,
                   help="topic filter (repeatable); placeholders %%i %%c %%u %%rand_N")  # fmt: skip
    s.add_argument("-q", "--qos", type=int, choices=(0, 1, 2), default=0,
                   help="subscription QoS [default: 0]")  # fmt: skip
    p = sub.add_parser("pub", help="publish", **kw)
    _common(p)
    p.add_argument("-I", "--interval_of_msg", type=float, default=1000.0,
                   help="ms between messages of one client; 0: as fast as the connection and "
                        "-F allow [default: 1000]")  # fmt: skip
    p.add_argument("-t", "--topic", required=True,
                   help="topic; placeholders %%i %%c %%u %%s %%rand_N")  # fmt: skip
    p.add_argument("-s", "--size", type=int, default=256,
                   help="payload bytes; 24 or more carry a timestamp and sequence number for "
                        "latency and loss [default: 256]")  # fmt: skip
    p.add_argument("-m", "--message", default=None, help="fixed payload (no latency then)")
    p.add_argument("-q", "--qos", type=int, choices=(0, 1, 2), default=0,
                   help="QoS [default: 0]")  # fmt: skip
    _flag(p, "-r", "--retain", help="retain")
    p.add_argument("-L", "--limit", type=int, default=0,
                   help="messages to publish in all, then stop [default: 0, no limit]")  # fmt: skip
    p.add_argument("-F", "--inflight", type=int, default=1,
                   help="QoS 1/2 messages in flight per client; 0: no limit "
                        "[default: 1]")  # fmt: skip


def finish(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Derived settings and cross-flag checks."""
    if args.quic and args.ws:
        parser.error("--quic and --ws exclude each other")
    if args.quic:
        args.transport = "quic"
    elif args.ws:
        args.transport = "wss" if args.ssl else "ws"
    else:
        args.transport = "ssl" if args.ssl else "tcp"
    if args.port is None:
        args.port = DEFAULT_PORTS[args.transport]
    if args.count < 0 or args.workers < 1:
        parser.error("-c must be >= 0 and -j >= 1")
    if (args.quic_streams or args.migrate_every) and not args.quic:
        parser.error("--quic-streams and --migrate-every need --quic")
    args.workers = min(args.workers, max(1, args.count))
    args.ifaddrs = [a.strip() for a in args.ifaddr.split(",") if a.strip()]
    if args.bench_command != "pub":
        args.qos = getattr(args, "qos", 0)
    return args


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    return finish(args, parser)
