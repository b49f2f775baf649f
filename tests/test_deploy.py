"""deploy/: every file is valid for the tool that reads it, and honest about the code.

- nats-cluster/ configs are current with the catalog (generate.py --check);
- systemd units pass `systemd-analyze verify`, and menders.target wants exactly
  the catalog's actors;
- compose.yaml has one service per catalog actor plus nats, each actor holding
  only its own password; its menders.toml loads;
- Prometheus config and rules pass promtool (check config, check rules, test
  rules); a real Prometheus scrapes a real actor process;
- every metric the rules and the Grafana dashboard name is defined in the code,
  with the labels they use, and every dashboard query runs on a real Prometheus.

Tools from Debian packages are skipped with the package named when missing,
except under CI=true, where a missing tool fails.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from actors.runtime import config as config_mod
from actors.stack.natsserver import free_port
from bus_schemas import catalog
from bus_schemas.natsconf import password_env
from tests.harness import REPO, Bus, require_binary

DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        message = "PyYAML not installed (pip install pyyaml)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return yaml


def load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text())


# --- nats-cluster -------------------------------------------------------------------


def _cluster_generator() -> Any:
    spec = importlib.util.spec_from_file_location("cluster_generate",
                                                  DEPLOY / "nats-cluster" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_configs_are_current_with_the_catalog() -> None:
    gen = _cluster_generator()
    for name, text in gen.files().items():
        committed = (DEPLOY / "nats-cluster" / name).read_text()
        assert committed == text, f"{name} is stale: run python deploy/nats-cluster/generate.py"
    # The same users and permissions as the single server's nats.conf, verbatim.
    auth = (DEPLOY / "nats-cluster" / "auth.conf").read_text()
    top = (REPO / "nats.conf").read_text()
    assert auth[auth.index("authorization {"):] == top[top.index("authorization {"):]
    names, clients, routes = set(), set(), set()
    for i in range(1, 4):
        node = (DEPLOY / "nats-cluster" / f"node-{i}.conf").read_text()
        assert "include ./auth.conf" in node and "authorization" not in node.split("cluster {")[0]
        names.add(re.search(r"^server_name: (\S+)$", node, re.M).group(1))  # type: ignore[union-attr]
        clients.add(re.search(r"^listen: (\S+)$", node, re.M).group(1))  # type: ignore[union-attr]
        routes.add(re.search(r"^  listen: (\S+)$", node, re.M).group(1))  # type: ignore[union-attr]
        assert "  name: menders\n" in node and f'"./data/menders-{i}"' in node
        assert "password: $MENDERS_NATS_ROUTE_PASSWORD" in node
    assert len(names) == len(clients) == len(routes) == 3
    assert gen.main(["--check"]) == 0


def test_cluster_env_holds_every_secret() -> None:
    gen = _cluster_generator()
    text = gen.env_lines({u: f"pw{u}" for u in [*catalog.ACTORS, catalog.OPERATOR,
                                                  catalog.ADMIN]}, "routepw")
    env = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    assert env["MENDERS_NATS_ROUTE_PASSWORD"] == "routepw"
    assert env["MENDERS_NATS_ROUTES"].count("nats-route://route:routepw@127.0.0.1:") == 3
    for user in [*catalog.ACTORS, catalog.OPERATOR, catalog.ADMIN]:
        assert env[password_env(user)] == f"pw{user}"


# --- systemd ------------------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    """key -> values (a key may repeat), all sections merged; comments dropped."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_systemd_actor_unit_runs_one_sandboxed_actor_restarted_on_failure() -> None:
    u = _unit("menders@.service")
    assert u["ExecStart"] == ["/opt/menders/venv/bin/menders run %i"]
    assert u["EnvironmentFile"] == ["/etc/menders/%i.env"]
    assert "MENDERS_CONFIG=/etc/menders/menders.toml" in u["Environment"]
    assert "MENDERS_HOME=/var/lib/menders/%i" in u["Environment"]
    assert u["StateDirectory"] == ["menders/%i"]
    assert u["Restart"] == ["on-failure"] and u["KillSignal"] == ["SIGTERM"]
    assert u["TimeoutStopSec"] and u["RestartSec"] and u["RestartMaxDelaySec"]
    for key, value in {"DynamicUser": "yes", "NoNewPrivileges": "yes",
                       "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes"}.items():
        assert u[key] == [value], key
    assert u["WantedBy"] == ["menders.target"] and u["PartOf"] == ["menders.target"]


def test_systemd_target_wants_every_catalog_actor() -> None:
    wants = " ".join(_unit("menders.target")["Wants"]).split()
    instances = [w for w in wants if w.startswith("menders@")]
    assert sorted(instances) == sorted(f"menders@{a}.service" for a in catalog.ACTORS)


@pytest.mark.e2e  # systemd-analyze as a process
def test_systemd_analyze_finds_no_problem_in_the_units(tmp_path: Path) -> None:
    """`systemd-analyze verify`, with ExecStart pointed at this venv's real binaries."""
    analyze = require_binary("systemd-analyze", "systemd")
    bindir = Path(sys.executable).parent
    for src in (DEPLOY / "systemd").iterdir():
        if src.suffix in (".service", ".target"):
            text = src.read_text().replace("/opt/menders/venv/bin/", f"{bindir}/")
            (tmp_path / src.name).write_text(text)
    assert (bindir / "menders").exists() and (bindir / "nats-server").exists()
    units = ["menders@auditor.service", "menders@governor.service", "menders.target",
             "nats-server.service", "menders-nats@1.service"]
    out = subprocess.run([analyze, "verify", "--man=no", *(str(tmp_path / u) for u in units)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    problems = [
        line for line in (out.stdout + out.stderr).splitlines()
        # Backoff keys of systemd >= 254: older versions ignore them, as documented.
        if line.strip() and not re.search(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'",
                                          line)
    ]
    assert out.returncode == 0 and not problems, "\n".join(problems)


# --- compose ------------------------------------------------------------------------


def test_compose_one_service_per_actor_with_only_its_password() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services: dict[str, Any] = compose["services"]
    assert "nats" in services and "webshop" in services
    runs = {name: s["command"][2] for name, s in services.items()
            if s.get("command", [])[:2] == ["menders", "run"]}
    assert sorted(runs.values()) == sorted(catalog.ACTORS)  # exactly one service per actor
    everyone = {password_env(u) for u in [*catalog.ACTORS, catalog.OPERATOR, catalog.ADMIN]}
    for name, actor in runs.items():
        assert name == actor
        env = services[name]["environment"]
        secrets = {k for k in env if k.startswith("MENDERS_NATS_PASSWORD_")}
        assert secrets == {password_env(actor)}, (actor, secrets)
        assert env["MENDERS_NATS_URL"] == "nats://nats:4222"
        assert services[name]["depends_on"]["provision"]["condition"] == \
            "service_completed_successfully"
        assert str(9464 + catalog.ACTORS.index(actor)) in services[name]["expose"]
    # nats reads every user's password from its environment (nats.conf); nobody else does.
    assert set(services["nats"]["environment"]) == everyone
    assert {k for k in services["provision"]["environment"]
            if k.startswith("MENDERS_NATS_PASSWORD_")} == {password_env(catalog.ADMIN)}
    assert not any(k.startswith("MENDERS_NATS_PASSWORD_")
                   for k in services["webshop"].get("environment", {}))
    # Nothing in the file is a literal secret: every password is an interpolation.
    for s in services.values():
        for key, value in (s.get("environment") or {}).items():
            if key.startswith("MENDERS_NATS_PASSWORD_"):
                assert str(value).startswith("${" + key + ":?"), key


def test_compose_config_loads_with_metrics_on_all_interfaces_and_an_external_shop() -> None:
    cfg = config_mod.load(DEPLOY / "menders.compose.toml")
    assert cfg.runtime.metrics_host == "0.0.0.0"
    shop = cfg.subjects["webshop"]
    assert shop.url == "http://webshop:8080" and not shop.embedded


# --- prometheus ---------------------------------------------------------------------


def test_prometheus_targets_match_the_catalog() -> None:
    conf = load_yaml(PROM / "prometheus.yml")
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    base = config_mod.RuntimeConfig().metrics_base_port
    targets = {sc["labels"]["actor"]: sc["targets"] for sc in jobs["menders"]["static_configs"]}
    assert targets == {a: [f"127.0.0.1:{base + i}"] for i, a in enumerate(catalog.ACTORS)}
    assert jobs["menders"]["honor_labels"] is True
    shop = config_mod.Config().subjects["webshop"].url.removeprefix("http://")
    assert jobs["webshop"]["static_configs"][0]["targets"] == [shop]


@pytest.mark.e2e  # promtool as a process
def test_promtool_accepts_the_config_and_rules_and_the_rule_tests_pass() -> None:
    promtool = require_binary("promtool", "prometheus")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                 ["test", "rules", "rules_test.yml"]):
        out = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"
        assert "SUCCESS" in out.stdout + out.stderr


# --- metric honesty ----------------------------------------------------------------

_DEFINE = re.compile(
    r"\b(counter|Counter|gauge|Gauge|histogram|Histogram)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\""
    r"\s*,\s*((?:(?:f?\"[^\"]*\")\s*)+)(?:,\s*\[([^\]]*)\])?"
)
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
             "histogram": ("_bucket", "_sum", "_count", "_created")}


def defined_metrics() -> dict[str, set[str]]:
    """Every exposed series name defined with prometheus-client in the code -> its labels."""
    out: dict[str, set[str]] = {}
    sources = [*REPO.glob("actors/**/*.py"), *REPO.glob("subjects/**/*.py")]
    for path in sources:
        text = path.read_text()
        for kind, name, _doc, labels in _DEFINE.findall(text):
            label_set = set(re.findall(r"\"([a-zA-Z_]+)\"", labels or ""))
            if kind.islower():
                label_set.add("actor")  # ActorMetrics.counter/gauge/histogram add it
            for suffix in _SUFFIXES[kind.lower()]:
                series = name + suffix
                out.setdefault(series, set()).update(label_set)
                if kind.lower() == "histogram" and suffix == "_bucket":
                    out[series].add("le")
    return out


_PROMQL_FUNCS = {"sum", "rate", "increase", "histogram_quantile", "max", "min", "avg", "by",
                 "without", "or", "and", "unless", "count", "label_values", "absent", "on",
                 "ignoring", "group_left", "group_right", "topk", "bottomk", "irate", "delta",
                 "deriv", "clamp_min", "clamp_max", "abs", "time", "vector", "scalar", "bool"}
TARGET_LABELS = {"job", "instance", "actor", "subject"}  # from prometheus.yml


def check_expr(expr: str, defined: dict[str, set[str]], recorded: set[str]) -> list[str]:
    problems = []
    stripped = re.sub(r"\"[^\"]*\"", '""', expr)  # label values are not names
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    groups = re.findall(grouping, stripped)
    names_only = re.sub(grouping, "", stripped)
    metrics = []
    for m in re.finditer(r"(?<![\w:$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", names_only):
        name, selector = m.group(1), m.group(2) or ""
        after = names_only[m.end():].lstrip()
        if name in _PROMQL_FUNCS or after.startswith("(") or re.fullmatch(r"\d.*", name):
            continue
        if name == "up":
            labels = TARGET_LABELS
        elif name in recorded:
            labels = None
        elif name in defined:
            labels = defined[name] | {"job", "instance"}
        else:
            problems.append(f"{name}: no such metric in the code ({expr})")
            continue
        metrics.append(labels)
        for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", selector):
            if labels is not None and label not in labels:
                problems.append(f"{name} has no label {label!r} ({expr})")
    known = set().union(*(x for x in metrics if x is not None)) if metrics else set()
    if all(x is not None for x in metrics):
        for group in groups:
            for label in re.findall(r"\w+", group):
                if label not in known:
                    problems.append(f"by ({label}): no metric in the query has it ({expr})")
    return problems


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "menders.json").read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            exprs.append(var["definition"].removeprefix("label_values(").rsplit(",", 1)[0])
    return exprs


def _rule_exprs() -> tuple[list[str], set[str]]:
    rules = load_yaml(PROM / "rules.yml")
    exprs, recorded = [], set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs.append(rule["expr"])
            if "record" in rule:
                recorded.add(rule["record"])
    return exprs, recorded


def test_metric_extraction_sees_the_runtime_metrics() -> None:
    defined = defined_metrics()
    assert defined["menders_messages_handled_total"] >= {"actor", "kind", "outcome"}
    assert defined["menders_handler_duration_seconds_bucket"] >= {"actor", "kind", "le"}
    assert defined["menders_in_flight"] == {"actor"}
    assert defined["menders_nats_errors_total"] == {"actor"}
    assert "menders_executions" not in defined  # counters are exposed as _total
    # The checker itself rejects what it should.
    assert check_expr("rate(menders_nonexistent_total[5m])", defined, set())
    assert check_expr('menders_in_flight{kind="x"}', defined, set())
    assert check_expr("sum by (consumer) (menders_in_flight)", defined, set())
    assert not check_expr("sum by (actor) (menders_in_flight)", defined, set())


def test_dashboard_and_rules_name_only_metrics_the_code_defines() -> None:
    defined = defined_metrics()
    rule_exprs, recorded = _rule_exprs()
    dash_exprs = _dashboard_exprs()
    assert len(dash_exprs) >= 20
    problems = [p for e in rule_exprs for p in check_expr(e, defined, recorded)]
    problems += [p for e in dash_exprs for p in check_expr(e, defined, set())]
    assert not problems, "\n".join(problems)
    # The dashboard covers what it promises.
    text = " ".join(dash_exprs)
    for metric in ("menders_messages_handled_total", "menders_handler_duration_seconds_bucket",
                   "menders_dead_letters_total", "menders_redeliveries_total",
                   "menders_in_flight", "up", "menders_executions_total",
                   "menders_verdicts_total", "menders_incidents_open",
                   "menders_escalations_total", "menders_nats_errors_total"):
        assert re.search(rf"\b{metric}\b", text), metric


def test_dashboard_json_is_a_grafana_dashboard() -> None:
    dash = json.loads((DEPLOY / "grafana" / "menders.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


# --- a real Prometheus against a real actor -----------------------------------------


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.loads(resp.read())


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _start_prometheus(binary: str, conf: Path, tsdb: Path, web: int,
                      log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [binary, f"--config.file={conf}", f"--storage.tsdb.path={tsdb}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)


async def _until(what: str, fn: Any, within: float, log: Path) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = await asyncio.to_thread(fn)
            if result:
                return result
            last = result
        except Exception as exc:
            last = exc
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what} not within {within}s (last: {last!r})\n" + _tail(log))


@pytest.mark.timeout(45)
async def test_real_prometheus_scrapes_a_real_actor(bus: Bus, tmp_path: Path) -> None:
    prometheus = require_binary("prometheus", "prometheus")
    yaml = _yaml()
    metrics_port = free_port()
    actor = bus.spawn("auditor", MENDERS_METRICS_PORT=str(metrics_port))
    await bus.wait_heartbeat("auditor")

    # The committed config and rules, with the menders job pointed at this one actor.
    conf = yaml.safe_load((PROM / "prometheus.yml").read_text())
    conf["global"]["scrape_interval"] = "1s"
    conf["global"]["evaluation_interval"] = "1s"
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "menders")
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"],
                              "labels": {"actor": "auditor"}}]
    conf["scrape_configs"] = [job]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    shutil.copy(PROM / "rules.yml", tmp_path / "rules.yml")

    web = free_port()
    base = f"http://127.0.0.1:{web}"
    log = tmp_path / "prometheus.log"
    proc = _start_prometheus(prometheus, tmp_path / "prometheus.yml", tmp_path / "tsdb", web, log)
    try:
        def query(q: str) -> list[dict[str, Any]]:
            data = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q}))
            assert data["status"] == "success", data
            return data["data"]["result"]  # type: ignore[no-any-return]

        def target_up() -> bool:
            return any(r["metric"].get("actor") == "auditor" and r["value"][1] == "1"
                       for r in query('up{job="menders"}'))

        await _until("the actor's target is up", target_up, 30, log)
        in_flight = await _until("menders_in_flight{actor=\"auditor\"} is queryable",
                                 lambda: query('menders_in_flight{actor="auditor"}'), 15, log)
        assert in_flight[0]["metric"]["actor"] == "auditor"
        assert query('menders_nats_errors_total{actor="auditor"}')[0]["value"][1] == "0"
        assert actor.alive()

        # The committed rules loaded, alerting rules among them.
        rules = _get_json(f"{base}/api/v1/rules")["data"]["groups"]
        names = {r["name"] for g in rules for r in g["rules"]}
        assert {"MendersActorDown", "MendersDeadLetters", "MendersEscalation"} <= names
        assert all(r["health"] != "err" for g in rules for r in g["rules"]), rules

        # Every dashboard query parses and runs on this Prometheus.
        for expr in _dashboard_exprs():
            q = (expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
                 .replace("$actor", ".*"))
            query(q)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
