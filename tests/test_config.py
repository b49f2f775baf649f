"""The TOML config: defaults that run the demo, and errors that name the key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec
import pytest

from actors.runtime import config as cfg
from bus_schemas.messages import MAX_APPROVAL_TTL_S
from tests.harness import REPO


def test_no_file_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MENDERS_CONFIG", raising=False)
    c = cfg.load(None)
    assert c == cfg.Config()
    assert c.nats.port == 4222 and c.runtime.max_message_bytes == 256 * 1024
    assert c.governor.mode == "approve" and "webshop" in c.subjects


def test_an_empty_file_decodes_to_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "menders.toml"
    path.write_text("")
    assert cfg.load(path) == cfg.Config()


def test_every_default_is_valid_under_its_own_schema() -> None:
    # forbid_unknown_fields and the types hold for the defaults themselves.
    assert msgspec.convert(msgspec.to_builtins(cfg.Config()), cfg.Config) == cfg.Config()


def test_values_are_read_into_typed_fields(tmp_path: Path) -> None:
    path = tmp_path / "menders.toml"
    path.write_text(
        '[nats]\nport = 5222\nsync_always = true\n'
        '[runtime]\nnak_backoff_s = [0.1, 0.5]\n'
        '[governor]\nmode = "approve"\nallow = { webshop = ["restart_worker"] }\n'
        '[subjects.shop2]\nurl = "http://127.0.0.1:9000"\nembedded = false\n'
    )
    c = cfg.load(path)
    assert c.nats.port == 5222 and c.nats.sync_always is True
    assert c.nats_url == "nats://127.0.0.1:5222"
    assert c.runtime.nak_backoff_s == [0.1, 0.5]
    assert c.governor.mode == "approve"
    assert c.governor.allow == {"webshop": ["restart_worker"]}
    assert c.subjects["shop2"].embedded is False


def test_config_path_comes_from_the_environment(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "menders.toml"
    path.write_text("[nats]\nport = 6000\n")
    monkeypatch.setenv("MENDERS_CONFIG", str(path))
    assert cfg.load().nats.port == 6000


@pytest.mark.parametrize("ttl", [0, -1, MAX_APPROVAL_TTL_S + 1])
def test_an_approval_ttl_outside_its_bound_is_refused_naming_the_key(tmp_path: Path,
                                                                      ttl: float) -> None:
    path = tmp_path / "menders.toml"
    path.write_text(f"[governor]\napproval_ttl_s = {ttl}\n")
    with pytest.raises(cfg.ConfigError, match=r"governor\.approval_ttl_s") as info:
        cfg.load(path)
    assert str(path) in str(info.value) and str(MAX_APPROVAL_TTL_S) in str(info.value)
    path.write_text(f"[governor]\napproval_ttl_s = {MAX_APPROVAL_TTL_S}\n")
    assert cfg.load(path).governor.approval_ttl_s == MAX_APPROVAL_TTL_S


def test_every_config_key_is_read_somewhere() -> None:
    """A key nobody reads is a promise the code does not keep: read it or remove it.
    (ExecutorConfig is checked with the executor.)"""
    sources = "\n".join(p.read_text() for root in ("actors", "subjects")
                        for p in (REPO / root).rglob("*.py")
                        if p.name != "config.py" or p.parent.name != "runtime")
    structs = [cfg.NatsConfig, cfg.RuntimeConfig, cfg.SupervisorConfig, cfg.GovernorConfig,
               cfg.PlannerConfig, cfg.VerifierConfig, cfg.SubjectConfig, cfg.LlmConfig]
    unread = [f"{s.__name__}.{f}" for s in structs for f in s.__struct_fields__
              if not re.search(rf"\.{f}\b", sources)]
    assert unread == []


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        ('[nats]\nport = "4222"\n', r"\$\.nats\.port"),
        ("[nats]\nprot = 4222\n", r"prot.*\$\.nats|\$\.nats.*prot"),
        ("[runtime]\nnak_backoff_s = 0.5\n", r"\$\.runtime\.nak_backoff_s"),
        ('[governor]\nmode = "yolo"\n', r"\$\.governor\.mode"),
        ("[subjects.web]\nkind = 3\n", r"\$\.subjects\[\.\.\.\]\.kind"),
        ("surprise = 1\n", r"surprise"),
    ],
)
def test_a_bad_key_or_type_names_the_key(tmp_path: Path, toml: str, where: str) -> None:
    path = tmp_path / "menders.toml"
    path.write_text(toml)
    with pytest.raises(cfg.ConfigError, match=where) as info:
        cfg.load(path)
    assert str(path) in str(info.value)


def test_invalid_toml_says_so(tmp_path: Path) -> None:
    path = tmp_path / "menders.toml"
    path.write_text("[nats\nport = 1\n")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(path)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(cfg.ConfigError, match=r"cannot read config .*nope\.toml"):
        cfg.load(missing)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text("")
    path.chmod(0)
    with pytest.raises(cfg.ConfigError, match=r"cannot read config.*Permission denied"):
        cfg.load(path)


def test_a_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read config"):
        cfg.load(tmp_path)
