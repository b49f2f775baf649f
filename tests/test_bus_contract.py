"""The bus contract: every message round-trips, evolves safely and fails clearly."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus_schemas import catalog, codec
from bus_schemas import messages as m
from tests.harness import sample

# Text that survives JSON either way; ids/subject tokens drawn from the token grammar.
TEXT = st.text(max_size=20)
TOKEN = st.from_regex(m.SUBJECT_NAME, fullmatch=True)
FLOAT = st.floats(allow_nan=False, allow_infinity=False, width=64)


def strategy_for(t: mi.Type) -> st.SearchStrategy[Any]:
    """A hypothesis strategy for a msgspec type, derived from msgspec's own inspection."""
    match t:
        case mi.StrType(pattern=str() as pattern, max_length=longest):
            drawn = st.from_regex(pattern, fullmatch=True)
            return drawn if longest is None else drawn.filter(lambda x: len(x) <= longest)
        case mi.StrType():
            return TEXT
        case mi.IntType():
            return st.integers(-(2**53), 2**53)
        case mi.FloatType():
            return FLOAT
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.AnyType():
            return st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), TEXT)
        case mi.LiteralType(values=values):
            return st.sampled_from(values)
        case mi.ListType(item_type=item):
            return st.lists(strategy_for(item), max_size=3)
        case mi.VarTupleType(item_type=item):
            return st.lists(strategy_for(item), max_size=3).map(tuple)
        case mi.DictType(key_type=k, value_type=v):
            return st.dictionaries(strategy_for(k), strategy_for(v), max_size=3)
        case mi.UnionType(types=types):
            return st.one_of(*(strategy_for(x) for x in types))
        case mi.StructType(cls=cls):
            return struct_strategy(cls)
    raise NotImplementedError(t)


def struct_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in info.fields:
        # The managed subject and the actor are bus-subject tokens, so keep them valid.
        fields[f.name] = TOKEN if f.name in ("subject", "actor") else strategy_for(f.type)
    return st.builds(cls, **fields)


MESSAGES = m.ALL_MESSAGES
ids = [c.__name__ for c in MESSAGES]


def _required_field(cls: type[m.Event]) -> str:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return next(f.name for f in info.fields if f.required)


@pytest.mark.parametrize("cls", MESSAGES, ids=ids)
def test_every_message_round_trips(cls: type[m.Event]) -> None:
    event = sample(cls)
    payload = codec.encode(event)
    assert json.loads(payload)["kind"] == m.kind_of(cls)
    assert codec.decode(payload) == event  # through the union of every message
    assert codec.decode(payload, (cls,)) == event  # and through its own decoder


@pytest.mark.parametrize("cls", MESSAGES, ids=ids)
def test_every_message_carries_the_envelope(cls: type[m.Event]) -> None:
    doc = json.loads(codec.encode(sample(cls)))
    for key in ("id", "incident_id", "causation_id", "producer", "ts", "v", "kind"):
        assert key in doc, key
    assert doc["v"] == m.SCHEMA_VERSION


@pytest.mark.parametrize("cls", MESSAGES, ids=ids)
def test_unknown_fields_from_a_newer_producer_are_ignored(cls: type[m.Event]) -> None:
    event = sample(cls)
    doc = json.loads(codec.encode(event))
    doc["added_in_v2"] = {"nested": [1, 2, 3]}
    doc["v"] = m.SCHEMA_VERSION + 1
    decoded = codec.decode(json.dumps(doc).encode(), (cls,))
    assert msgspec.structs.replace(decoded, v=event.v) == event


@pytest.mark.parametrize("cls", MESSAGES, ids=ids)
def test_a_missing_required_field_is_rejected_by_name(cls: type[m.Event]) -> None:
    name = _required_field(cls)
    doc = json.loads(codec.encode(sample(cls)))
    del doc[name]
    with pytest.raises(codec.DecodeError, match=f"`{name}`"):
        codec.decode(json.dumps(doc).encode(), (cls,))


@pytest.mark.parametrize("cls", MESSAGES, ids=ids)
def test_a_wrong_type_is_rejected_naming_the_field(cls: type[m.Event]) -> None:
    doc = json.loads(codec.encode(sample(cls)))
    doc["ts"] = "yesterday"
    with pytest.raises(codec.DecodeError, match=r"\$\.ts"):
        codec.decode(json.dumps(doc).encode(), (cls,))


def test_a_nested_wrong_type_names_the_path() -> None:
    doc = json.loads(codec.encode(sample(m.ExecutionApproved)))
    doc["step"]["timeout_s"] = "soon"
    with pytest.raises(codec.DecodeError, match=r"\$\.step\.timeout_s"):
        codec.decode(json.dumps(doc).encode(), (m.ExecutionApproved,))


def test_malformed_json_is_a_decode_error() -> None:
    with pytest.raises(codec.DecodeError, match="malformed JSON"):
        codec.decode(b'{"kind": "heartbeat", ')


@pytest.mark.parametrize("cls", [m.Observation, m.ExecutionApproved])
def test_a_deeply_nested_payload_is_a_decode_error_not_a_crash(cls: type[m.Event]) -> None:
    # Found by the bus fuzzer: msgspec recurses into a field it skips, and a few thousand
    # brackets raised RecursionError, which no consumer expects (a poison message).
    doc = codec.encode(sample(cls))
    deep = doc[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(codec.DecodeError, match="nested too deeply"):
        codec.decode(deep, (cls,))


def test_a_message_of_another_kind_is_rejected_by_a_narrow_decoder() -> None:
    payload = codec.encode(sample(m.Verdict))
    with pytest.raises(codec.DecodeError, match="kind"):
        codec.decode(payload, (m.Diagnosis, m.Plan))
    with pytest.raises(codec.DecodeError):
        codec.decode(payload, (m.Plan,))


def test_every_catalog_schema_is_a_known_message_and_every_message_has_a_subject() -> None:
    schemas = [b.schema for b in catalog.BUS_SUBJECTS]
    assert set(schemas) <= set(m.ALL_MESSAGES)
    assert set(m.ALL_MESSAGES) <= set(schemas), "a message with no bus subject"
    assert len(schemas) == len(set(schemas)), "one bus subject per message kind"
    for c in catalog.CONSUMERS:
        assert c.schemas and set(c.schemas) <= set(m.ALL_MESSAGES)


def test_every_bus_subject_is_under_the_prefix_and_in_its_stream() -> None:
    for b in catalog.BUS_SUBJECTS:
        assert b.pattern.startswith(f"{catalog.PREFIX}.")
        stream = catalog.stream_named(b.stream)
        concrete = catalog.bus_subject_of(sample(b.schema))
        assert any(_covers(p, concrete) for p in stream.subjects), (b.pattern, stream.name)


def _covers(pattern: str, subject: str) -> bool:
    if pattern.endswith(".>"):
        return subject.startswith(pattern[:-1])
    return pattern == subject


@pytest.mark.parametrize("bad", ["a.b", "a*", "web>", "web shop", "", "tab\there", "*", ">"])
@pytest.mark.parametrize("cls", [m.Observation, m.Plan, m.ExecutionApproved, m.Decision],
                         ids=lambda c: c.__name__)
def test_bus_subject_of_rejects_a_managed_subject_that_is_not_one_token(
        cls: type[m.Event], bad: str) -> None:
    event = msgspec.structs.replace(sample(cls), subject=bad)
    with pytest.raises(ValueError, match="bad"):
        catalog.bus_subject_of(event)


def test_bus_subject_of_rejects_a_bad_actor_token() -> None:
    beat = m.Heartbeat(actor="planner.evil", pid=1, started_at=0.0)
    with pytest.raises(ValueError, match="actor"):
        catalog.bus_subject_of(beat)


def test_bus_subjects_are_concrete_for_valid_events() -> None:
    prefix = catalog.PREFIX
    assert prefix == "menders"  # the bus contract: every bus subject starts with it
    assert catalog.bus_subject_of(sample(m.ExecutionApproved)) == f"{prefix}.exec.approved.webshop"
    decision = msgspec.structs.replace(sample(m.Decision), outcome="killed")
    assert catalog.bus_subject_of(decision) == f"{prefix}.decision.webshop.killed"
    assert catalog.bus_subject_of(sample(m.Heartbeat)) == f"{prefix}.heartbeat.diagnoser"


def _same(a: Any, b: Any) -> bool:
    """Equality where -0.0 == 0.0 and float fields compare by value."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_encode_then_decode_is_identity(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(MESSAGES))
    event = data.draw(struct_strategy(cls))
    payload = codec.encode(event)
    assert _same(codec.decode(payload), event)
    assert _same(codec.decode(payload, (cls,)), event)
    # A second encode is byte-identical: the payload is a stable function of the event.
    assert codec.encode(codec.decode(payload, (cls,))) == payload
