"""One error tree: every exception menders defines is a MendersError, and the CLI maps
each class to its exit status in one table."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from actors.cli.main import EXIT_FAILED, EXIT_NATS, EXIT_USAGE, CliError, exit_code, main
from actors.cli.operator import OperatorError
from actors.runtime.config import ConfigError
from actors.runtime.credentials import CredentialsError
from actors.stack.up import StackError
from bus_schemas.errors import MendersError
from tests.harness import modules_of

# The webshop's own service internals: errors of the managed system, not of menders.
SUBJECT_INTERNALS = {"subjects.webshop.shop", "subjects.webshop.db"}


def our_modules() -> list[str]:
    return [name for name, _ in modules_of("actors", "bus_schemas", "subjects")
            if not name.endswith("__main__") and name not in SUBJECT_INTERNALS]


def test_every_exception_menders_defines_is_a_menders_error() -> None:
    strays = []
    for name in our_modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == name and not issubclass(obj, MendersError)):
                strays.append(f"{name}.{obj.__name__}")
    assert strays == []


@pytest.mark.parametrize(("exc", "code"), [
    (ConfigError("bad key"), EXIT_USAGE),
    (CredentialsError("no password"), EXIT_NATS),
    (OperatorError("no server"), EXIT_NATS),
    (StackError("stack failed"), EXIT_FAILED),
    (CliError("usage", EXIT_USAGE), EXIT_USAGE),
    (MendersError("anything else"), EXIT_FAILED),
])
def test_each_error_class_has_one_exit_status(exc: MendersError, code: int) -> None:
    assert exit_code(exc) == code


def test_a_bad_config_file_exits_2_with_the_key_named(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "menders.toml"
    bad.write_text("[governor]\nmode = 'yolo'\n")
    assert main(["--config", str(bad), "run", "executor"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("menders run: ") and "mode" in err
