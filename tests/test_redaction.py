"""Secrets stay home: the redaction filter, pure, and where it sits (config, memory)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from actors.auditor.memory import fold
from actors.diagnoser.llm.prompt import untrusted
from actors.runtime.config import Config, ConfigError, load
from actors.runtime.redaction import MARK, Cuts, Redactor
from bus_schemas import messages as m

LEAKS = [
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijk",
     "eyJhbGciOiJIUzI1NiJ9"),
    ("connecting to postgres://shop:hunter2-Secret@db.internal:5432/shop", "hunter2-Secret"),
    ("boto: using key AKIAIOSFODNN7EXAMPLE for s3", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("config reload: ANTHROPIC_KEY sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv", "sk-ant-api03"),
    ("slack hook xoxb-123456789012-abcdefghijklmnop failed", "xoxb-123456789012"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
     "MIIEowIBAAKCAQEA"),
    ('login failed for user=bob password="s3cr3t!" from 10.0.0.4', "s3cr3t!"),
    ("GET /callback?code=ok&api_key=abcd1234efgh HTTP/1.1", "abcd1234efgh"),
]
CLEAN = [
    "GET /health 200 in 3ms",
    "pool exhausted: 20/20 connections in use",
    "token bucket refilled for client-7",
    "password reset page viewed",
    "etcdserver: mvcc: database space exceeded",
]


@pytest.mark.parametrize(("line", "secret"), LEAKS, ids=[s[:12] for _, s in LEAKS])
def test_each_usual_leak_is_cut_and_counted_with_its_context_kept(line: str,
                                                                  secret: str) -> None:
    out, n = Redactor().text(line)
    assert secret not in out and MARK in out and n >= 1, out
    if not line.startswith("-----BEGIN"):  # a key block goes whole
        assert out.split()[0] == line.split()[0]  # the line still says what it was about


@pytest.mark.parametrize("line", CLEAN)
def test_ordinary_log_lines_pass_untouched(line: str) -> None:
    assert Redactor().text(line) == (line, 0)


def test_structures_are_cut_string_by_string_and_stay_valid_untrusted_json() -> None:
    scrub = Cuts(Redactor(["cust-[0-9]{6}"]))
    data = {"recent_logs": [LEAKS[1][0], "order for cust-123456 placed"],
            "symptoms": {"p99_ms": 950.0}, "password": "field names are kept"}
    text = untrusted("incident", data, scrub)
    body = json.loads(text.split("\n")[1])
    assert scrub.count == 2
    assert "hunter2" not in text and "cust-123456" not in text
    assert body["symptoms"] == {"p99_ms": 950.0} and "password" in body


def test_a_configured_pattern_that_does_not_compile_is_a_config_error_naming_it(
        tmp_path: Path) -> None:
    path = tmp_path / "menders.toml"
    path.write_text('[redaction]\npatterns = ["ok-[0-9]+", "broken(["]\n')
    with pytest.raises(ConfigError, match=r"redaction\.patterns\[1\] 'broken\(\['"):
        load(path)
    assert msgspec.convert({"redaction": {"patterns": ["x"]}}, Config).redaction.patterns == ["x"]


def test_incident_memory_keeps_no_secret_quoted_in_a_hypothesis_or_summary() -> None:
    iid = m.new_id()
    events: list[m.Event] = [
        m.IncidentOpened(incident_id=iid, subject="shop", invariant="error_rate",
                         summary="errors", value=0.5, threshold=0.1),
        m.Diagnosis(incident_id=iid, invariant="error_rate", confidence=0.7,
                    hypothesis=f"auth to the DB fails: log says {LEAKS[1][0]}"),
        m.IncidentSummary(incident_id=iid, summary=f"The key {LEAKS[2][0]} was rotated."),
        m.IncidentResolved(incident_id=iid, invariant="error_rate", reason="healthy"),
    ]
    past = fold(events, Redactor())
    assert past is not None
    assert "hunter2" not in past.hypothesis and MARK in past.hypothesis
    assert "AKIAIOSFODNN7EXAMPLE" not in past.summary
