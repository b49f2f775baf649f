"""`python -m subjects.ratelimiter serve ...` (the cluster) and `... node ...` (one node)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from subjects.ratelimiter.options import decode_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subjects.ratelimiter")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run redis, the limiter nodes, chaos and load")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--chaos-port", type=int, required=True)
    run.add_argument("--data-dir", type=Path, required=True)
    run.add_argument("--options", default="{}", help="the options table, as JSON")
    node = sub.add_parser("node", help="one limiter node (started by `serve`)")
    node.add_argument("--id", required=True)
    node.add_argument("--port", type=int, required=True)
    node.add_argument("--config", type=Path, required=True)
    node.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "node":
        from subjects.ratelimiter.node import serve_node

        asyncio.run(serve_node(args.id, args.port, args.config, args.log))
        return 0
    from subjects.ratelimiter.server import serve

    options = decode_options(json.loads(args.options))
    args.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.host, args.port, args.chaos_port, args.data_dir, options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
