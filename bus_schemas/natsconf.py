"""nats.conf, derived from the catalog: one user per actor, least privilege.

`python -m bus_schemas.natsconf > nats.conf` writes the committed file; a test
fails when the two disagree. Passwords are never in the file: each user's
password comes from the environment variable MENDERS_NATS_PASSWORD_<USER>,
which `menders up` generates for the loopback server it starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from bus_schemas import catalog as cat


@dataclass
class Permissions:
    publish: set[str] = field(default_factory=set)
    subscribe: set[str] = field(default_factory=set)
    allow_responses: bool = False


def password_env(user: str) -> str:
    return f"MENDERS_NATS_PASSWORD_{user.upper()}"


def servers(url: str) -> list[str]:
    """A NATS URL as the nats CLI takes it: one, or several comma-separated (a cluster's
    nodes; the client fails over between them). nats-py wants them as a list."""
    found = [u.strip() for u in url.split(",") if u.strip()]
    return found or [url]


def inbox_prefix(user: str) -> str:
    """Each user's own reply inbox, so nobody else can read its replies."""
    return f"_INBOX_{user}"


def _concrete(spec: cat.BusSubject, user: str) -> str:
    """The subject a user may publish: its own actor token, other placeholders wildcards."""
    tokens = []
    for token in spec.pattern.split("."):
        if token == "{actor}":
            token = user
        elif token.startswith("{"):
            token = "*"
        tokens.append(token)
    return ".".join(tokens)


def _consumer_rights(c: cat.Consumer) -> set[str]:
    return {
        f"$JS.API.CONSUMER.MSG.NEXT.{c.stream}.{c.durable}",
        # Its own consumer's config (the ack wait the server really applies).
        f"$JS.API.CONSUMER.INFO.{c.stream}.{c.durable}",
        # v1 and v2 (domain + account hash) ack subjects; v2 is the default from 2.15.
        f"$JS.ACK.{c.stream}.{c.durable}.>",
        f"$JS.ACK.*.*.{c.stream}.{c.durable}.>",
    }


def _kv_rights(user: str) -> set[str]:
    rights: set[str] = set()
    for bucket, writers in cat.KV_WRITERS.items():
        if user in writers:
            rights.add(f"$KV.{bucket}.>")
    for (bucket, key), writers in cat.KV_KEY_WRITERS.items():
        if user in writers:
            rights.add(f"$KV.{bucket}.{key}")
    for bucket, readers in cat.KV_READERS.items():
        if user in readers:
            stream = f"KV_{bucket}"
            rights |= {
                f"$JS.API.STREAM.INFO.{stream}",
                f"$JS.API.DIRECT.GET.{stream}.>",
                f"$JS.API.STREAM.MSG.GET.{stream}",
            }
    for bucket, watchers in cat.KV_WATCHERS.items():
        if user in watchers:
            stream = f"KV_{bucket}"
            # Ordered (ephemeral) consumers on this one stream only, and their flow control.
            rights |= {
                f"$JS.API.CONSUMER.CREATE.{stream}",
                f"$JS.API.CONSUMER.CREATE.{stream}.>",
                f"$JS.API.CONSUMER.DELETE.{stream}.>",
                f"$JS.API.CONSUMER.INFO.{stream}.>",
                f"$JS.FC.{stream}.>",
            }
    return rights


def permissions_for(user: str) -> Permissions:
    p = Permissions()
    p.subscribe.add(f"{inbox_prefix(user)}.>")
    for spec in cat.BUS_SUBJECTS:
        if user in spec.publishers:
            p.publish.add(_concrete(spec, user))
    for c in cat.consumers_of(user):
        p.publish |= _consumer_rights(c)
    p.publish |= _kv_rights(user)
    for pattern, (responder, requesters) in cat.SERVICES.items():
        if user == responder:
            p.subscribe.add(pattern)
            p.allow_responses = True
        if user in requesters:
            p.publish.add(pattern)
    if user == cat.OPERATOR:
        # Reads everything on the bus and JetStream state; writes only approvals
        # and control (above) and may create ephemeral consumers to view streams.
        p.subscribe.add("menders.>")
        p.publish |= {
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",
            "$JS.API.STREAM.LIST",
            "$JS.API.STREAM.INFO.*",
            "$JS.API.STREAM.MSG.GET.*",
            "$JS.API.DIRECT.GET.>",
            "$JS.API.CONSUMER.NAMES.*",
            "$JS.API.CONSUMER.LIST.*",
            "$JS.API.CONSUMER.INFO.*.*",
            "$JS.API.CONSUMER.CREATE.*",  # ephemeral only: no durable name
            "$JS.FC.>",
        }
    return p


def _list(items: set[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in sorted(items)) + "]"


def _user_block(user: str) -> str:
    p = permissions_for(user)
    lines = [
        "    {",
        f"      user: {user}",
        f"      password: ${password_env(user)}",
        "      permissions: {",
        f"        publish: {{ allow: {_list(p.publish)} }}",
        f"        subscribe: {{ allow: {_list(p.subscribe)} }}",
    ]
    if p.allow_responses:
        lines.append("        allow_responses: true")
    lines += ["      }", "    }"]
    return "\n".join(lines)


def render(sync_always: bool = False) -> str:
    users = [*cat.ACTORS, cat.OPERATOR]
    admin = "\n".join(
        [
            "    {",
            f"      user: {cat.ADMIN}",
            f"      password: ${password_env(cat.ADMIN)}",
            "    }",
        ]
    )
    blocks = [_user_block(u) for u in users] + [admin]
    return (
        "# Generated from bus_schemas/catalog.py by `python -m bus_schemas.natsconf`.\n"
        "# Do not edit by hand: tests/test_natsconf.py fails when the two disagree.\n"
        "# Passwords come from MENDERS_NATS_PASSWORD_<USER> environment variables;\n"
        "# `menders up` generates them for the loopback server it starts.\n"
        "# listen, port and store_dir are set on the command line by the launcher.\n"
        "\n"
        "server_name: menders\n"
        "max_payload: 1MB\n"
        "\n"
        "jetstream {\n"
        "  # `sync_interval: always` ([nats] sync_always = true) closes the OS-crash\n"
        "  # window at a large throughput cost: see docs/architecture.md.\n"
        + ("  sync_interval: always\n" if sync_always else "")
        + "}\n"
        "\n"
        "authorization {\n"
        "  users = [\n" + "\n".join(blocks) + "\n  ]\n}\n"
    )


if __name__ == "__main__":
    print(render(), end="")
