"""`python -m subjects.kvcluster serve --host H --port P --chaos-port C --data-dir D
[--options JSON]` (the embedded cluster) and `... loadgen --endpoints URLS --port P`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import msgspec

from subjects.kvcluster.loadgen import serve_load
from subjects.kvcluster.options import KvClusterOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subjects.kvcluster")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run three etcd members, their load and chaos port")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, required=True, help="m1's client port (the base)")
    run.add_argument("--chaos-port", type=int, required=True)
    run.add_argument("--data-dir", type=Path, required=True)
    run.add_argument("--options", default="{}", help="the options table, as JSON")
    load = sub.add_parser("loadgen", help="put/get load on the members, metrics on --port")
    load.add_argument("--endpoints", required=True, help="comma-separated client URLs")
    load.add_argument("--host", default="127.0.0.1")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--rps", type=float, default=40.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from subjects.kvcluster.server import serve

        options = msgspec.json.decode(args.options, type=KvClusterOptions)
        args.data_dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(serve(args.host, args.port, args.chaos_port, args.data_dir, options))
        return 0
    serve_load(args.endpoints.split(","), args.rps, args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
