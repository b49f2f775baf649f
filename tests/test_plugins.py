"""Subject kinds as plugins: a distribution outside this repo registers a kind through
the `menders.subjects` entry-point group and the whole crew can load it; a plugin can
never replace a built-in kind."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import subjects
from actors.cli.main import main
from actors.runtime.config import Config, SubjectConfig

TOY = '''
from subjects.base import ActionSpec, InvariantSpec, NoParams, SubjectDefinition


def _unused(cfg):
    raise NotImplementedError("the toy kind is only loaded, never run, here")


DEFINITION = SubjectDefinition(
    kind="toy",
    actions={"poke": ActionSpec("poke", "Poke the toy.", NoParams, "low", True, 2.0)},
    invariants=(InvariantSpec(name="toy_ok", metric="badness", description="low badness",
                              threshold=1.0),),
    runbooks=(),
    make_observer=_unused,
    make_action_client=_unused,
)
'''


@pytest.fixture
def toy_installed(tmp_path: Path) -> Iterator[Path]:
    """A distribution `menders-toy` on sys.path: a package and its dist-info, whose
    entry points register kind `toy` and try to take over `webshop`."""
    (tmp_path / "menders_toy").mkdir()
    (tmp_path / "menders_toy" / "__init__.py").write_text(TOY)
    info = tmp_path / "menders_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: menders-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [menders.subjects]
        toy = menders_toy:DEFINITION
        webshop = menders_toy:DEFINITION
        """))
    sys.path.insert(0, str(tmp_path))
    subjects._registered.cache_clear()
    subjects.load.cache_clear()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("menders_toy", None)
        subjects._registered.cache_clear()
        subjects.load.cache_clear()


def test_an_installed_plugin_kind_is_found_loaded_and_configurable(
        toy_installed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert subjects.kinds() == ("webshop", "ratelimiter", "kvcluster", "service", "toy")
    toy = subjects.load("toy")
    assert toy.kind == "toy" and list(toy.actions) == ["poke"]
    # The built-in webshop stays ours, whatever a plugin declares.
    assert subjects.load("webshop").kind == "webshop" and "poke" not in \
        subjects.load("webshop").actions
    cfg = msgspec.convert({"subjects": {"mine": {"kind": "toy", "embedded": False}}}, Config)
    assert cfg.subjects["mine"].kind == "toy"
    assert main(["subjects"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("toy") and "plugin" in line and "poke[low]" in line
               for line in out.splitlines()), out


def test_unknown_and_embedded_plugin_kinds_are_config_errors_naming_the_kind(
        toy_installed: Path) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"unknown subject kind 'nope'; "
                       r"installed: webshop, ratelimiter, kvcluster, service, toy"):
        msgspec.convert({"kind": "nope"}, SubjectConfig)
    with pytest.raises(msgspec.ValidationError, match=r"kind 'toy' is a plugin: menders "
                       r"cannot start it itself; set embedded = false"):
        msgspec.convert({"kind": "toy"}, SubjectConfig)


def test_a_plugin_that_is_not_a_definition_of_its_kind_is_refused(toy_installed: Path) -> None:
    (toy_installed / "menders_toy" / "wrong.py").write_text("DEFINITION = 42\n")
    info = toy_installed / "menders_toy-0.1.dist-info" / "entry_points.txt"
    info.write_text("[menders.subjects]\ntoy = menders_toy.wrong:DEFINITION\n")
    subjects._registered.cache_clear()
    with pytest.raises(TypeError, match=r"menders_toy\.wrong:DEFINITION is not a "
                       r"SubjectDefinition of kind 'toy'"):
        subjects.load("toy")
