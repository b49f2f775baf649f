"""`python -m subjects.kvcluster loadgen --endpoints URL,URL,URL --port P [--rps R]`."""

from __future__ import annotations

import argparse

from subjects.kvcluster.loadgen import serve_load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subjects.kvcluster")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("loadgen", help="put/get load on the members, metrics on --port")
    load.add_argument("--endpoints", required=True, help="comma-separated client URLs")
    load.add_argument("--host", default="127.0.0.1")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--rps", type=float, default=40.0)
    args = parser.parse_args(argv)
    serve_load(args.endpoints.split(","), args.rps, args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
