"""What the runtime's admission (`process.admit`) says of a payload before any handler
sees it: every refusal is a dead letter, and its reason must let a human find the fault."""

from __future__ import annotations

import json

import msgspec
import pytest

from actors.runtime.config import RuntimeConfig
from actors.runtime.process import admit
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.samples import sample

LIMIT = RuntimeConfig().max_message_bytes
OPENED = next(c for c in catalog.CONSUMERS if c.durable == "diagnoser")  # IncidentOpened
AUDITOR = next(c for c in catalog.CONSUMERS if c.durable == "auditor")  # nearly every kind


def opened(**kw: object) -> m.IncidentOpened:
    event = sample(m.IncidentOpened)
    assert isinstance(event, m.IncidentOpened)
    return msgspec.structs.replace(event, **{"incident_id": "inc1", **kw})


def subject_of(event: m.Event) -> str:
    return catalog.bus_subject_of(event)


def doc(event: m.Event) -> dict[str, object]:
    out: dict[str, object] = json.loads(codec.encode(event))
    return out


def test_a_valid_message_on_its_subject_is_admitted() -> None:
    event = opened()
    assert admit(codec.encode(event), subject_of(event), OPENED.schemas, LIMIT) == event


@pytest.mark.parametrize(("payload", "needle"), [
    (b'{"kind": "incident.opened", "id": ', "malformed JSON"),
    (json.dumps({**doc(opened()), "ts": "yesterday"}).encode(), "$.ts"),
    (json.dumps({**doc(opened()), "incident_id": "a.b"}).encode(), "$.incident_id"),
    (json.dumps({**doc(opened()), "pad": "x" * (LIMIT + 1)}).encode(), "oversized"),
    (codec.encode(opened())[:-1] + b',"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     "nested too deeply"),
    (codec.encode(opened(incident_id="")), "without an incident_id"),
], ids=["malformed", "wrong type", "id not one token", "oversized", "too deep",
        "no incident"])
def test_each_kind_of_bad_payload_is_refused_with_a_reason_that_names_it(
        payload: bytes, needle: str) -> None:
    refused = admit(payload, subject_of(opened()), OPENED.schemas, LIMIT)
    assert isinstance(refused, str) and needle in refused, refused


def test_a_kind_on_a_subject_it_does_not_belong_on_is_refused() -> None:
    # The auditor reads both kinds, so only the subject check can refuse it.
    plan = msgspec.structs.replace(sample(m.Plan), incident_id="inc1")
    refused = admit(codec.encode(plan), subject_of(opened()), AUDITOR.schemas, LIMIT)
    assert refused == f"a plan does not belong on {subject_of(opened())}"


def test_a_kind_the_consumer_never_reads_is_refused_by_its_decoder() -> None:
    plan = msgspec.structs.replace(sample(m.Plan), incident_id="inc1")
    refused = admit(codec.encode(plan), subject_of(plan), OPENED.schemas, LIMIT)
    assert isinstance(refused, str) and "invalid message" in refused


def test_events_outside_an_incident_need_no_incident_id() -> None:
    obs = sample(m.Observation)
    assert obs.incident_id == ""
    detector = next(c for c in catalog.CONSUMERS if c.durable == "detector_p0")
    assert admit(codec.encode(obs), subject_of(obs), detector.schemas, LIMIT) == obs


def test_an_observation_is_admitted_under_its_own_partition_only() -> None:
    # MENDERS_OBS stores "menders.obs.<subject>.<partition>": that subject is where a
    # consumer reads it; another partition's is not, nor an extra token.
    obs = sample(m.Observation)
    p = catalog.partition_of(obs.subject)
    stored = f"{subject_of(obs)}.{p}"
    assert catalog.stored_subject_of(obs) == stored
    schemas = (m.Observation,)
    assert admit(codec.encode(obs), stored, schemas, LIMIT) == obs
    wrong = f"{subject_of(obs)}.{(p + 1) % catalog.OBS_PARTITIONS}"
    assert admit(codec.encode(obs), wrong, schemas, LIMIT) == (
        f"an observation does not belong on {wrong}")


def test_delivery_counts_read_both_ack_subject_formats_as_nats_py_does() -> None:
    from nats.aio.msg import Msg

    from actors.runtime.actor import Delivery

    consumer = catalog.consumers_of("planner")[0]
    where = f"{consumer.stream}.{consumer.durable}"
    tail = "3.1207.88.1764800000000000000.4"
    for reply in (f"$JS.ACK.{where}.{tail}", f"$JS.ACK._.abc123.{where}.{tail}.x",
                  f"$JS.ACK._.abc123.{where}.{tail}"):
        msg = Msg(_client=None, subject="s", reply=reply)  # type: ignore[arg-type]
        d = Delivery(msg, consumer)
        md = msg.metadata
        assert (d.num_delivered, d.stream_seq) == (md.num_delivered, md.sequence.stream)
        assert (d.num_delivered, d.stream_seq, d.redelivered) == (3, 1207, True)
