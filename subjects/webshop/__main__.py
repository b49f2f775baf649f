"""`python -m subjects.webshop serve --host H --port P --chaos-port C --data-dir D`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from subjects.webshop.server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subjects.webshop")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the shop, its chaos port and its load generator")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--chaos-port", type=int, required=True)
    run.add_argument("--data-dir", type=Path, required=True)
    run.add_argument("--load-rps", type=float, default=40.0,
                     help="requests per second from the built-in load generator (0: none)")
    args = parser.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.host, args.port, args.chaos_port, args.data_dir, args.load_rps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
