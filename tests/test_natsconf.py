"""nats.conf follows from the catalog, and the catalog's safety rules show in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bus_schemas import catalog, natsconf
from bus_schemas import messages as m
from tests.harness import REPO

USERS = (*catalog.ACTORS, catalog.OPERATOR)
EVENT_STREAMS = tuple(s.name for s in catalog.STREAMS)
APPROVED = catalog.subject_for(m.ExecutionApproved, subject="webshop")


def _may_publish(user: str, subject: str) -> bool:
    return any(catalog.matches(p, subject) for p in natsconf.permissions_for(user).publish)


def test_committed_nats_conf_is_the_rendered_catalog() -> None:
    committed = (REPO / "nats.conf").read_text()
    assert committed == natsconf.render(), (
        "nats.conf disagrees with bus_schemas/catalog.py: "
        "run `python -m bus_schemas.natsconf > nats.conf`"
    )


def test_no_password_is_written_into_the_conf() -> None:
    text = natsconf.render()
    passwords = re.findall(r"password:\s*(\S+)", text)
    assert passwords and all(p.startswith("$MENDERS_NATS_PASSWORD_") for p in passwords)


def test_every_user_and_admin_has_a_block() -> None:
    text = natsconf.render()
    for user in (*USERS, catalog.ADMIN):
        assert f"user: {user}\n" in text
        assert f"password: ${natsconf.password_env(user)}\n" in text


@pytest.mark.parametrize("user", USERS)
def test_only_the_governor_may_publish_approved_executions(user: str) -> None:
    allowed = _may_publish(user, APPROVED)
    assert allowed == (user == "governor")
    # And no broad grant reaches it by another route.
    assert not any(p in (catalog.EVERYTHING, catalog.under("exec"), ">") for p in
                   natsconf.permissions_for(user).publish)


@pytest.mark.parametrize("consumer", catalog.CONSUMERS, ids=lambda c: c.durable)
def test_each_durable_is_pulled_and_acked_only_by_its_actor(consumer: catalog.Consumer) -> None:
    rights = {
        f"$JS.API.CONSUMER.MSG.NEXT.{consumer.stream}.{consumer.durable}",
        f"$JS.ACK.{consumer.stream}.{consumer.durable}.>",
        f"$JS.ACK.*.*.{consumer.stream}.{consumer.durable}.>",
    }
    # Concrete subjects a server would use: v1 and v2 (domain + account hash) acks.
    concrete = (
        f"$JS.API.CONSUMER.MSG.NEXT.{consumer.stream}.{consumer.durable}",
        f"$JS.ACK.{consumer.stream}.{consumer.durable}.1.2.3.1700000000000000000.0",
        f"$JS.ACK._.ACCHASH.{consumer.stream}.{consumer.durable}.1.2.3.1700000000000000000.0.x",
    )
    for user in USERS:
        perms = natsconf.permissions_for(user).publish
        if user == consumer.actor:
            assert rights <= perms
        for subject in concrete:
            assert _may_publish(user, subject) == (user == consumer.actor), (user, subject)


@pytest.mark.parametrize("user", USERS)
def test_no_user_may_create_consumers_on_event_streams(user: str) -> None:
    for stream in EVENT_STREAMS:
        for subject in (
            f"$JS.API.CONSUMER.CREATE.{stream}.evil",
            f"$JS.API.CONSUMER.CREATE.{stream}.evil.{APPROVED}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.evil",
            f"$JS.API.CONSUMER.DELETE.{stream}.{stream.lower()}",
            f"$JS.API.STREAM.PURGE.{stream}",
            f"$JS.API.STREAM.DELETE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
        ):
            assert not _may_publish(user, subject), (user, subject)
        # Ephemeral creation (no durable token) only for the operator's stream views.
        assert _may_publish(user, f"$JS.API.CONSUMER.CREATE.{stream}") == (
            user == catalog.OPERATOR
        )


@pytest.mark.parametrize("user", USERS)
def test_users_publish_only_what_the_catalog_lets_them(user: str) -> None:
    for spec in catalog.BUS_SUBJECTS:
        concrete = spec.pattern.format(subject="webshop", actor=user, outcome="vetoed")
        assert _may_publish(user, concrete) == (user in spec.publishers), (user, concrete)


@pytest.mark.parametrize("actor", catalog.ACTORS)
def test_actors_cannot_impersonate_each_other_on_heartbeats_and_dead_letters(actor: str) -> None:
    for other in catalog.ACTORS:
        for kind in (m.Heartbeat, m.DeadLetter):
            assert _may_publish(actor, catalog.subject_for(kind, actor=other)) == (actor == other)


@pytest.mark.parametrize("user", USERS)
def test_each_user_reads_only_its_own_inbox(user: str) -> None:
    subs = natsconf.permissions_for(user).subscribe
    assert f"_INBOX_{user}.>" in subs
    assert "_INBOX.>" not in subs and ">" not in subs
    for other in USERS:
        if other != user:
            assert not any(catalog.matches(p, f"_INBOX_{other}.abc") for p in subs)
    assert (catalog.EVERYTHING in subs) == (user == catalog.OPERATOR)


def test_kv_writes_follow_the_catalog() -> None:
    gov = f"$KV.{catalog.GOVERNOR_BUCKET}"
    ledger = f"$KV.{catalog.EXEC_LEDGER_BUCKET}"
    for user in USERS:
        assert _may_publish(user, f"{gov}.mode") == (user == "governor")
        assert _may_publish(user, f"{gov}.kill") == (user in ("governor", catalog.OPERATOR))
        assert _may_publish(user, f"{ledger}.x1") == (user == "executor")


def test_admin_is_the_only_unrestricted_user() -> None:
    text = natsconf.render()
    admin_block = text[text.index(f"user: {catalog.ADMIN}\n"):]
    assert "permissions" not in admin_block.split("}")[0]


def test_every_kv_bucket_with_rights_is_provisioned_and_has_a_writer() -> None:
    provisioned = {b.name for b in catalog.KV_BUCKETS}
    with_rights = set(catalog.KV_WRITERS) | set(catalog.KV_READERS) | set(catalog.KV_WATCHERS)
    assert with_rights == provisioned
    assert all(catalog.KV_WRITERS.get(b) for b in provisioned)


def test_the_readmes_nats_cli_examples_use_the_operators_inbox_prefix() -> None:
    # Without it the operator's requests (stream view, kv get) never get their replies.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    calls = [line for line in readme.splitlines() if line.startswith("alias mnats=")]
    assert calls, "the README's nats CLI alias is gone"
    assert all(f"--inbox-prefix {natsconf.inbox_prefix(catalog.OPERATOR)}" in c
               and f"--user {catalog.OPERATOR}" in c for c in calls)


def test_a_nats_url_may_list_a_clusters_nodes_comma_separated() -> None:
    servers = natsconf.servers
    assert servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    assert servers("nats://a:4222, nats://b:4222,nats://c:4222,") == [
        "nats://a:4222", "nats://b:4222", "nats://c:4222"]
