"""The bus fuzzer, short, as CI runs it: `python bench/fuzz_bus.py` against the real
runtime (a provisioned nats-server, every consuming actor as its own process).

Hypothesis draws the payloads for every consumed subject (bench/fuzz_bus.py says
which classes); each is published with the credentials of that subject's own
publisher, between valid messages. The bench's JSON is the evidence read here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import REPO, require_nats_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_garbage_on_every_consumed_subject_is_dead_lettered_and_crashes_nothing() -> None:
    require_nats_server()
    done = subprocess.run([sys.executable, "bench/fuzz_bus.py", "--per-subject", "25",
                           "--seed", "3"], cwd=REPO, capture_output=True, text=True,
                          timeout=280)
    assert done.stdout.strip(), done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["crashed"] == [], result
    assert result["lost"] == 0 and result["doubled"] == 0, result
    assert result["drained"], result["stuck"]
    assert result["handler_failures"] == [], result["handler_failures"]
    assert result["good_dead_lettered"] == [], result["good_dead_lettered"]
    assert result["letters_without_reason"] == 0
    assert result["letters_with_another_reason"] == 0
    # Every consumed subject was tried, and with more than one class of garbage.
    from bench.fuzz_bus import targets

    assert set(result["per_subject"]) == {t.subject for t in targets()}
    for subject, row in result["per_subject"].items():
        assert row["tried"] >= 10 and row["refused_by_admit"] >= 1, (subject, row)
        assert len(row["classes"]) >= 3, (subject, row)
    assert done.returncode == 0, done.stderr[-3000:]
