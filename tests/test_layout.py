"""The layout's rules, checked on the source: who may import whom, and who may spell the bus.

- An actor package imports only `actors.runtime`, `bus_schemas`, `subjects` and itself:
  no actor knows another's internals, nor the CLI's or the stack's.
- `bus_schemas` imports nothing of ours; `subjects` nothing of `actors`; the runtime no actor.
- Outside `bus_schemas/`, no code spells a `menders.` bus subject or a stream or KV
  bucket name: everything asks the catalog, so a rename happens in one place.

Each checker is also run on a deliberate violation, so a checker that cannot fail fails here.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

import pytest

from bus_schemas import catalog
from tests.harness import REPO, modules_of

OURS = ("actors", "bus_schemas", "subjects")


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Every module an AST imports (function-local imports included), fully named."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                # `from actors import runtime` names the module actors.runtime
                yield node.lineno, f"{node.module}.{alias.name}"


def allowed_for(package: str) -> tuple[str, ...]:
    """The module prefixes a package of ours may import."""
    if package.startswith("actors.") and package.split(".")[1] in catalog.ACTORS:
        own = ".".join(package.split(".")[:2])
        return ("actors.runtime", "bus_schemas", "subjects", own)
    if package.startswith("actors.runtime"):
        return ("actors.runtime", "bus_schemas", "subjects")
    if package.startswith("bus_schemas"):
        return ("bus_schemas",)
    if package.startswith("subjects"):
        return ("bus_schemas", "subjects")
    return OURS  # cli, stack: operations may use anything


def import_violations(package: str, source: str) -> list[str]:
    allowed = allowed_for(package)
    out = []
    for line, module in imported_modules(ast.parse(source)):
        if module.split(".")[0] not in OURS:
            continue  # stdlib and third-party
        if not any(module == a or module.startswith(a + ".") for a in allowed):
            out.append(f"{package}:{line} imports {module}")
    return out


def test_actor_packages_import_only_the_runtime_bus_schemas_subjects_and_themselves() -> None:
    found = [v for name, path in modules_of(*OURS)
             for v in import_violations(name, path.read_text())]
    assert found == []


def test_every_actor_is_a_package_with_an_actor_module() -> None:
    assert sorted(p.name for p in (REPO / "actors").iterdir()
                  if p.is_dir() and not p.name.startswith("__")) == sorted(
        [*catalog.ACTORS, "cli", "runtime", "stack"])
    for actor in catalog.ACTORS:
        assert (REPO / "actors" / actor / "actor.py").is_file(), actor


@pytest.mark.parametrize("package, source", [
    ("actors.governor.actor", "from actors.executor.actor import watch_forever\n"),
    ("actors.monitor.actor", "def f():\n    from actors.diagnoser import investigation\n"),
    ("actors.planner.actor", "import actors.cli.operator\n"),
    ("actors.runtime.process", "from actors.auditor.store import AuditStore\n"),
    ("bus_schemas.catalog", "from actors.runtime import config\n"),
    ("subjects.base", "from actors.runtime.config import Config\n"),
])
def test_the_import_rule_catches_a_deliberate_violation(package: str, source: str) -> None:
    assert import_violations(package, source) != []


def test_the_import_rule_lets_an_actor_use_its_own_package_and_the_shared_ones() -> None:
    source = ("from actors.executor.ledger import Ledger\nfrom actors.runtime import Actor\n"
              "from bus_schemas import catalog\nimport subjects\nimport msgspec\n")
    assert import_violations("actors.executor.actor", source) == []


# --- bus subject, stream and bucket literals ---------------------------------------------

_SUBJECT = re.compile(
    rf"\b{catalog.PREFIX}\.(?:[>*]|(?:{'|'.join(sorted(catalog.STAGES))})\b)")
_NAMES = re.compile(r"\b(?:" + "|".join(
    [s.name for s in catalog.STREAMS] + [b.name for b in catalog.KV_BUCKETS]) + r")\b")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def literal_violations(name: str, source: str) -> list[str]:
    """String constants (f-string parts included, docstrings not) that spell the bus."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if _SUBJECT.search(node.value) or _NAMES.search(node.value):
                out.append(f"{name}:{node.lineno} spells {node.value[:60]!r}")
    return out


def test_no_code_outside_bus_schemas_spells_a_bus_subject_stream_or_bucket() -> None:
    found = [v for name, path in modules_of("actors", "subjects", "bench", "tests")
             for v in literal_violations(name, path.read_text())]
    assert found == []


@pytest.mark.parametrize("source", [
    f'SUBJECT = "{catalog.PREFIX}.incident.webshop.opened"\n',
    f'def f(s):\n    return f"{catalog.PREFIX}.obs.{{s}}"\n',
    f'TAIL = "{catalog.PREFIX}.>"\n',
    f'STREAM = "{catalog.EVENTS_STREAM}"\n',
    f'BUCKET = "{catalog.GOVERNOR_BUCKET}"\n',
])
def test_the_literal_rule_catches_a_deliberate_violation(source: str) -> None:
    assert literal_violations("example", source) != []


def test_the_literal_rule_allows_loggers_files_env_vars_metrics_and_docstrings() -> None:
    source = (f'"""Tail `{catalog.PREFIX}.>` to see it all."""\n'
              f'log = get_logger("{catalog.PREFIX}.executor")\n'
              f'CFG = "{catalog.PREFIX}.toml"\nENV = "MENDERS_CONFIG"\n'
              f'METRIC = "{catalog.PREFIX}_executions_total"\n')
    assert literal_violations("example", source) == []


# --- one publish path, one way to name a kind ----------------------------------------------

# Calls `.publish(...)` may make outside the runtime: the runtime's own and the operator's,
# both of which go through actors/runtime/publish.py.
_PUBLISHERS = {"self.rt", "rt", "operator"}


def path_violations(name: str, source: str) -> list[str]:
    """A raw NATS publish outside actors.runtime, or a kind read past messages.kind_of."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "__struct_config__":
            out.append(f"{name}:{node.lineno} reads __struct_config__ (use messages.kind_of)")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "publish" and not name.startswith("actors.runtime")
                and ast.unparse(node.func.value) not in _PUBLISHERS):
            out.append(f"{name}:{node.lineno} publishes past actors.runtime.publish")
    return out


def test_events_reach_the_bus_only_through_the_runtimes_publish_path() -> None:
    found = [v for name, path in modules_of("actors", "subjects")
             for v in path_violations(name, path.read_text())]
    found += [v for name, path in modules_of("bench", "tests")
              for v in path_violations(name, path.read_text()) if "__struct_config__" in v]
    assert found == []


@pytest.mark.parametrize("source", [
    "async def f(js, e):\n    await js.publish('x', b'')\n",
    "async def f(self, e):\n    await self.nc.publish('x', b'')\n",
    "def kind(e):\n    return type(e).__struct_config__.tag\n",
])
def test_the_publish_and_kind_rules_catch_a_deliberate_violation(source: str) -> None:
    assert path_violations("actors.planner.actor", source) != []


def test_the_publish_rule_lets_actors_publish_through_their_runtime() -> None:
    source = "async def f(self, e):\n    await self.rt.publish(e)\n"
    assert path_violations("actors.planner.actor", source) == []
