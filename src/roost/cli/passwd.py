"""``roost passwd FILE USER``: add, change or delete a user of a password file."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from roost.broker.passwords import DEFAULT_ITERATIONS, MIN_ITERATIONS, update_file


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "passwd",
        help="add, change or delete a user in a password file",
        description="Store a salted PBKDF2-HMAC-SHA256 (SCRAM-SHA-256) record for USER in FILE. "
        "The password is prompted for twice on a terminal, else read from the first line of "
        "stdin, unless --password is given. A running broker picks the change up by itself.",
    )
    p.add_argument("file", help="password file (created if missing)")
    p.add_argument("user")
    p.add_argument("--password", "-p", help="the password (visible to other local users: prefer "
                   "the prompt or stdin)")  # fmt: skip
    p.add_argument("--delete", "-D", action="store_true", help="remove USER")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                   help=f"PBKDF2 iterations (default {DEFAULT_ITERATIONS})")  # fmt: skip


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return args.password
    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def run_passwd(args: argparse.Namespace) -> int:
    try:
        if args.delete:
            if not update_file(args.file, args.user, None, args.iterations):
                print(f"roost passwd: no user {args.user!r} in {args.file}", file=sys.stderr)
                return 1
            print(f"deleted {args.user}")
            return 0
        if args.iterations < MIN_ITERATIONS:
            raise ValueError(f"--iterations must be at least {MIN_ITERATIONS}")
        password = _read_password(args)
        if not password:
            raise ValueError("empty password")
        existed = update_file(args.file, args.user, password, args.iterations)
    except (OSError, ValueError) as e:
        print(f"roost passwd: {e}", file=sys.stderr)
        return 2
    print(f"{'changed' if existed else 'added'} {args.user}")
    return 0
