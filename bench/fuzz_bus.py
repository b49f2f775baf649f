"""Fuzz every consumed bus subject against the real runtime, and print one JSON line.

    python bench/fuzz_bus.py                       # 60 payloads per subject, seed 0
    python bench/fuzz_bus.py --per-subject 300 --seed 7

A real nats-server (provisioned from the catalog) and every consuming actor as
its own process (`menders run <actor>`, its own credentials). For each bus
subject that a durable consumes, Hypothesis generates payloads: random bytes,
truncated and deeply nested JSON, valid envelopes of another kind, fields
replaced by arbitrary JSON, huge numbers, NaN and infinities, unicode, and
oversized bodies. Each is published with the credentials of the subject's own
publisher, between valid messages of the subject's kind.

What must hold (the JSON says each):
- no actor crashed (each still beats, with the pid it started with);
- every payload a consumer cannot take (`admit`, the runtime's own check) is
  dead-lettered by it exactly once, with a reason: `lost` counts those missing;
- each letter's reason is admission's own (the field at fault named, the size given);
- every consumer drained (nothing pending, nothing unacknowledged): what it
  could take, it handled;
- `handler_failures`: decodable payloads a handler raised on until their
  delivery limit (each a bug: a handler must handle or Reject, never crash).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from actors.runtime.actor import derive_id
from actors.runtime.process import admit
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.samples import sample

LIMIT = 256 * 1024  # the runtime's default max_message_bytes
DRAIN_TIMEOUT_S = 90.0
CONFIG = """[runtime]
metrics_base_port = 0
log_level = "ERROR"
nak_backoff_s = [0.05]

[subjects.webshop]
kind = "webshop"
url = "http://127.0.0.1:9"
embedded = false
"""


@dataclass(frozen=True)
class Target:
    """One concrete bus subject, who may publish on it, and which durables consume it."""

    subject: str
    schema: type[m.Event]
    stream: str
    publisher: str
    consumers: tuple[catalog.Consumer, ...]
    stored: str  # what consumers see: a partitioned stream appends the partition


def targets() -> list[Target]:
    out = []
    for b in catalog.BUS_SUBJECTS:
        event = _valid(b.schema, "target")
        subject = catalog.bus_subject_of(event)
        # A per-actor subject (a dead-letter subject) is that actor's alone to publish on.
        publisher = getattr(event, "actor", "") if "{actor}" in b.pattern else b.publishers[0]
        stored = catalog.stored_subject_of(event)
        consumers = tuple(c for c in catalog.CONSUMERS if c.stream == b.stream
                          and any(catalog.matches(f, stored) for f in c.filter_subjects))
        # A subject some durable reads must be fuzzed, never dropped by a filter mismatch.
        assert consumers or not any(b.schema in c.schemas for c in catalog.CONSUMERS), b
        if consumers:
            out.append(Target(subject, b.schema, b.stream, publisher, consumers, stored))
    return out


def _valid(schema: type[m.Event], tag: str) -> m.Event:
    """A valid message of the kind, with its own id and an incident to belong to."""
    return msgspec.structs.replace(sample(schema), id=f"fuzz-{tag}",
                                   incident_id="fuzz-incident")


# --- payloads ---------------------------------------------------------------------------

JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
             | st.text(max_size=40))
JSON_VALUE = st.recursive(JSON_LEAF, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                          max_leaves=12)
# Number tokens JSON has no value for, and values past every machine type.
NUMBER_TOKENS = st.sampled_from([b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e999",
                                 b"-1e999", b"1" + b"0" * 400, b"-0", b"1e-999",
                                 b"18446744073709551616", b"-9223372036854775809"])


def _good(schema: type[m.Event]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(codec.encode(_valid(schema, "mutated")))
    return doc


def _with_raw(doc: dict[str, Any], key: str, raw: bytes) -> bytes:
    marker = "\u0000fuzz\u0000"
    text = json.dumps({**doc, key: marker}).encode()
    return text.replace(json.dumps(marker).encode(), raw, 1)


def payloads(t: Target) -> st.SearchStrategy[tuple[str, bytes]]:
    """(what it is, the payload) for one target."""
    good = _good(t.schema)
    raw = json.dumps(good).encode()
    keys = sorted(good)
    others = [s for s in m.ALL_MESSAGES if s is not t.schema]

    def nested(depth: int, arrays: bool) -> tuple[str, bytes]:
        """A valid envelope with one extra field nested `depth` deep (arrays or objects)."""
        inner = b"[" * depth + b"]" * depth if arrays else (
            b'{"a":' * depth + b"1" + b"}" * depth)
        return "nested", _with_raw(good, "nested", inner)

    return st.one_of(
        st.binary(max_size=600).map(lambda b: ("bytes", b)),
        st.integers(0, len(raw) - 1).map(lambda n: ("truncated", raw[:n])),
        st.builds(nested, st.integers(100, 40_000), st.booleans()),
        st.sampled_from(others).map(lambda o: ("wrong kind", codec.encode(sample(o)))),
        st.tuples(st.sampled_from(keys), JSON_VALUE).map(
            lambda kv: ("field", json.dumps({**good, kv[0]: kv[1]}).encode())),
        st.tuples(st.sampled_from(keys), NUMBER_TOKENS).map(
            lambda kv: ("number", _with_raw(good, kv[0], kv[1]))),
        st.tuples(st.sampled_from(keys), st.text(min_size=1, max_size=200)).map(
            lambda kv: ("unicode", json.dumps({**good, kv[0]: kv[1]},
                                              ensure_ascii=False).encode())),
        st.integers(LIMIT + 1, 2 * LIMIT).map(
            lambda n: ("oversized", json.dumps({**good, "pad": "x" * n}).encode())),
    )


def generate(t: Target, count: int, at: int) -> list[tuple[str, bytes]]:
    """`count` payloads drawn by Hypothesis (seeded: the same run draws the same)."""
    drawn: list[tuple[str, bytes]] = []

    @seed(at)
    @settings(max_examples=count, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(payloads(t))
    def draw(p: tuple[str, bytes]) -> None:
        drawn.append(p)

    draw()
    return drawn


# --- the run ------------------------------------------------------------------------------


@dataclass
class Sent:
    target: Target
    seq: int
    what: str  # a payload class, or "good"
    refused_by: dict[str, str] = field(default_factory=dict)  # durable -> admit's reason


async def run(per_subject: int, at_seed: int, good_every: int) -> dict[str, Any]:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="menders-fuzz-"))
    actors = sorted({c.actor for c in catalog.CONSUMERS})
    async with common.bench_bus(tmp, CONFIG) as bus:
        procs = {a: bus.spawn(a) for a in actors}
        await bus.wait_heartbeats({a: 1 for a in actors}, timeout=60)
        operator = await bus.connect(catalog.OPERATOR)
        letters: list[m.DeadLetter] = []

        async def on_letter(msg: Any) -> None:
            try:  # the fuzzer's own garbage on the dead-letter subjects arrives here too
                e = codec.decode(msg.data, (m.DeadLetter,))
            except codec.DecodeError:
                return
            # The runtime's own letters only: their id derives from (consumer, sequence).
            if isinstance(e, m.DeadLetter) and e.id == derive_id(e.consumer, e.stream_seq):
                letters.append(e)

        await operator.subscribe(catalog.under("dlq"), cb=on_letter)
        js_of = {u: (await bus.connect(u)).jetstream(timeout=10)
                 for u in {t.publisher for t in targets()}}
        sent: list[Sent] = []
        for i, t in enumerate(targets()):
            drawn = generate(t, per_subject, at_seed * 1000 + i)
            for n, (what, payload) in enumerate(drawn):
                if n % good_every == 0:
                    good = codec.encode(_fresh(t, i, n))
                    ack = await js_of[t.publisher].publish(t.subject, good)
                    sent.append(Sent(t, ack.seq, "good"))
                ack = await js_of[t.publisher].publish(t.subject, payload)
                s = Sent(t, ack.seq, what)
                for c in t.consumers:
                    verdict = admit(payload, t.stored, c.schemas, LIMIT)
                    if isinstance(verdict, str):
                        s.refused_by[c.durable] = verdict
                sent.append(s)
        expected = {(d, s.target.stream, s.seq) for s in sent for d in s.refused_by}
        admin = await bus.connect(catalog.ADMIN)
        jsm = admin.jetstream(timeout=10)
        drained, stuck = await _drain(jsm, expected, letters)
        alive = {a: p.poll() is None for a, p in procs.items()}
        await bus.wait_heartbeats({a: 1 for a in actors if alive[a]}, timeout=10)
    return _report(sent, letters, expected, alive, stuck, drained, per_subject, at_seed,
                   time.monotonic() - started)


def _fresh(t: Target, i: int, n: int) -> m.Event:
    """A valid message of the target's kind, its id its own (the actors dedup by id)."""
    return _valid(t.schema, f"good-{i}-{n}")


async def _drain(jsm: Any, expected: set[tuple[str, str, int]],
                 letters: list[m.DeadLetter]) -> tuple[bool, list[str]]:
    """Until every expected letter is in and every consumer has nothing outstanding."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    stuck: list[str] = []
    while time.monotonic() < deadline:
        got = {(d.consumer, _stream_of(d.consumer), d.stream_seq) for d in letters}
        stuck = []
        for c in catalog.CONSUMERS:
            info = await jsm.consumer_info(c.stream, c.durable)
            if info.num_pending or info.num_ack_pending:
                stuck.append(f"{c.durable}: {info.num_pending} pending, "
                             f"{info.num_ack_pending} unacknowledged")
        if expected <= got and not stuck:
            return True, []
        await asyncio.sleep(0.5)
    return False, stuck


def _stream_of(durable: str) -> str:
    return next(c.stream for c in catalog.CONSUMERS if c.durable == durable)


def _report(sent: list[Sent], letters: list[m.DeadLetter],
            expected: set[tuple[str, str, int]], alive: dict[str, bool], stuck: list[str],
            drained: bool, per_subject: int, at_seed: int, seconds: float) -> dict[str, Any]:
    got: Counter[tuple[str, str, int]] = Counter(
        (d.consumer, _stream_of(d.consumer), d.stream_seq) for d in letters)
    by_key = {(s.target.stream, s.seq): s for s in sent}
    failures = [d for d in letters if d.reason.startswith("failed ")]
    unexplained = [d for d in letters if not d.reason.strip()]
    # A refused payload's letter says what admission said (the field at fault, the size).
    misreasoned = [d for d in letters
                   if (s := by_key.get((_stream_of(d.consumer), d.stream_seq))) is not None
                   and d.consumer in s.refused_by and d.reason != s.refused_by[d.consumer][:2000]]
    good_refused = [d for d in letters
                    if (s := by_key.get((_stream_of(d.consumer), d.stream_seq))) is not None
                    and s.what == "good" and not d.reason.startswith("rejected: ")]
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"tried": 0, "refused": 0,
                                                         "classes": Counter()})
    for s in sent:
        if s.what == "good":
            continue
        row = per[s.target.subject]
        row["tried"] += 1
        row["refused"] += bool(s.refused_by)
        row["classes"][s.what] += 1
    return {
        "bench": "fuzz_bus",
        "seed": at_seed,
        "per_subject_asked": per_subject,
        "tried": sum(r["tried"] for r in per.values()),
        "good_sent": sum(1 for s in sent if s.what == "good"),
        "lost": len(expected - set(got)),
        "doubled": sum(n - 1 for n in got.values() if n > 1),
        "crashed": sorted(a for a, ok in alive.items() if not ok),
        "drained": drained,
        "stuck": stuck,
        "handler_failures": [{"consumer": d.consumer, "reason": d.reason[:300],
                              "head": d.payload_head[:120]} for d in failures][:20],
        "good_dead_lettered": [{"consumer": d.consumer, "reason": d.reason[:200]}
                               for d in good_refused][:20],
        "letters_without_reason": len(unexplained),
        "letters_with_another_reason": len(misreasoned),
        "per_subject": {k: {"tried": v["tried"], "refused_by_admit": v["refused"],
                            "classes": dict(sorted(v["classes"].items()))}
                        for k, v in sorted(per.items())},
        "seconds": round(seconds, 1),
        "machine": common.machine(),
    }


def ok(result: dict[str, Any]) -> bool:
    return (result["lost"] == 0 and result["doubled"] == 0 and not result["crashed"]
            and result["drained"] and not result["handler_failures"]
            and not result["good_dead_lettered"] and result["letters_without_reason"] == 0
            and result["letters_with_another_reason"] == 0)


def main(argv: list[str] | None = None,
         out: Callable[[str], None] = print) -> int:
    p = argparse.ArgumentParser(prog="fuzz_bus", description=__doc__.splitlines()[0])
    p.add_argument("--per-subject", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--good-every", type=int, default=5, help="a valid message before "
                   "every N-th fuzzed one")
    args = p.parse_args(argv)
    if not 1 <= args.per_subject <= 10_000 or args.good_every < 1:
        p.error("--per-subject must be 1..10000 and --good-every >= 1")
    result = asyncio.run(run(args.per_subject, args.seed, args.good_every))
    result["ok"] = ok(result)
    common.write_result("fuzz_bus", result)
    out(json.dumps(result, default=_plain))
    return 0 if result["ok"] else 1


def _plain(o: object) -> object:
    return str(o)  # Counters and anything else JSON has no type for


if __name__ == "__main__":
    sys.exit(main())
