"""`menders check-config`: every problem of a config at once, each with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.cli.configcheck import problems_of
from actors.cli.main import main

GOOD = """\
[governor]
mode = "execute"
allow = { shop = ["recycle_pool"] }

[subjects.shop]
kind = "webshop"
url = "http://127.0.0.1:8080"
"""

BAD = """\
[nats]
port = "four"

[governor]
mode = "sometimes"

[bogus]
x = 1

[subjects.shop]
kind = "webshop"
scrape_interval_s = "fast"

[subjects.other]
kind = "nope"
"""

UNKNOWN_ACTIONS = """\
[governor]
allow = { shop = ["recycle_pool", "drop_database", "*"], ghost = ["*"] }

[subjects.shop]
kind = "webshop"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "menders.toml"
    path.write_text(text)
    return path


def test_a_good_config_has_no_problem_and_says_ok(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert problems_of(path) == []
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok"


def test_every_bad_key_is_listed_with_its_path(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD)
    got = problems_of(path)
    assert len(got) == 5, got
    assert got[0].startswith("$.nats.port: Expected `int`, got `str`")
    assert got[1].startswith("$.governor.mode: Invalid enum value 'sometimes'")
    assert got[2].startswith("$.bogus: unknown section")
    assert got[3].startswith("$.subjects.shop.scrape_interval_s: Expected `float`")
    assert got[4].startswith("$.subjects.other: unknown subject kind 'nope'; installed: "
                             "webshop, ratelimiter, kvcluster")
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err.count(f"{path}: $.") == 5


def test_the_allow_list_must_name_configured_subjects_and_registered_actions(
        tmp_path: Path) -> None:
    got = problems_of(write(tmp_path, UNKNOWN_ACTIONS))
    assert got == [
        "$.governor.allow.shop[1]: action 'drop_database' is not registered for kind "
        "'webshop' (registered: recycle_pool, scale_pool, failover_dependency, "
        "rollback_config, restart_worker, enable_cache, rotate_logs)",
        "$.governor.allow.ghost: no subject 'ghost' is configured (subjects: shop)"]


def test_unreadable_and_non_toml_files_are_one_clear_problem(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "missing.toml")[0].startswith("cannot read")
    assert problems_of(write(tmp_path, "[governor\nmode = 1"))[0].startswith("not valid TOML")
