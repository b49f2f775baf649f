"""The `service` kind: TOML declarations checked at load, parameters typed, templates
bounded, and its observer and actions against real local processes and servers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

import subjects
from actors.cli.configcheck import problems_of
from actors.runtime.config import SubjectConfig
from subjects.actionhttp import ActionFailed
from subjects.base import ActionError
from subjects.service import templates
from subjects.service.observer import ServiceObserver, SourceError, query_value
from subjects.service.options import PromQuery, ServiceOptions
from subjects.service.runner import ServiceActionClient

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "postgres.toml"


def options(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "metrics_url": "http://127.0.0.1:1/metrics",
        "metrics": {"queue": {"name": "jobs_queued"}},
        "invariants": [{"name": "queue_short", "metric": "queue", "threshold": 100,
                        "description": "the queue drains"}],
        "actions": {"drain": {"description": "drain the queue", "command": {
            "argv": [sys.executable, "-c", "print('drained {count}')"]},
            "params": {"count": {"type": "int", "min": 1, "max": 10}}}},
        "runbooks": [{"name": "stuck", "invariant": "queue_short", "hypothesis": "stuck",
                      "confidence": 0.8, "actions": [{"action": "drain",
                                                      "params": {"count": 3}}]}],
    }
    base.update(extra)
    return base


def error_of(opts: dict[str, Any]) -> str:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert({"kind": "service", "embedded": False, "options": opts},
                        SubjectConfig)
    return str(info.value)


def test_the_example_postgres_config_checks_clean() -> None:
    assert problems_of(EXAMPLE) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"actions": {"drain": {"description": "d", "command": {
        "argv": ["/bin/echo", "{cuont}"]}, "params": {"count": {"type": "int"}}}}},
     "options.actions.drain.command.argv[1]: the template references undeclared "
     "parameter(s) cuont"),
    ({"actions": {"drain": {"description": "d", "command": {"argv": ["{prog}"]},
                            "params": {"prog": {"type": "str", "pattern": "[a-z]+"}}}}},
     "options.actions.drain.command.argv[0]: the program must be literal"),
    ({"actions": {"drain": {"description": "d", "command": {"argv": ["/bin/echo", "{who}"]},
                            "params": {"who": {"type": "str"}}}}},
     "str parameter 'who' reaches an argv; declare a pattern or an enum"),
    ({"actions": {"drain": {"description": "d", "systemd": {"unit": "app-{n}.service",
                                                            "verb": "restart"},
                            "params": {"n": {"type": "str"}}}}},
     "options.actions.drain.systemd.unit: str parameter 'n' reaches an argv"),
    ({"actions": {"drain": {"description": "d", "http": {"url": "http://x/{a:>9}"},
                            "params": {"a": {"type": "int"}}}}},
     "options.actions.drain.http.url: bad template"),
    ({"actions": {"drain": {"description": "d"}}},
     "options.actions.drain: declare exactly one of http, command, systemd (got none)"),
    ({"actions": {"drain": {"description": "d", "retry": {"attempts": 3},
                            "command": {"argv": ["/bin/true"]}}}},
     "options.actions.drain.retry: only an idempotent action may retry"),
    ({"actions": {"drain": {"description": "d", "command": {"argv": ["/bin/true"]},
                            "params": {"n": {"type": "int", "min": 5, "max": 1}}}}},
     "options.actions.drain.params.n: min 5.0 is above max 1.0"),
    ({"invariants": [{"name": "q", "metric": "nope", "threshold": 1, "description": "d"}]},
     "options.invariants[0].metric: 'nope' is not observed (declared: queue)"),
    ({"runbooks": [{"name": "r", "invariant": "ghost", "hypothesis": "h",
                    "confidence": 0.5, "escalate": True}]},
     "options.runbooks[0].invariant: 'ghost' is not declared"),
    ({"runbooks": [{"name": "r", "when": {"queue": "about 3"}, "hypothesis": "h",
                    "confidence": 0.5, "escalate": True}]},
     "options.runbooks[0]: rule r: queue: bad condition 'about 3'"),
    ({"runbooks": [{"name": "r", "hypothesis": "h", "confidence": 0.5,
                    "actions": [{"action": "drain", "params": {"count": 99}}]}]},
     "options.runbooks[0].actions[0].params.count: Expected `int` <= 10"),
    ({"runbooks": [{"name": "r", "hypothesis": "h", "confidence": 0.5,
                    "actions": [{"action": "vacuum"}]}]},
     "options.runbooks[0].actions[0].action: 'vacuum' is not declared (declared: drain)"),
    ({"invariants": [{"name": "q", "metric": "queue", "threshold": 1, "description": "d",
                      "alerts": ["Queue Stuck"]}]},
     "options.invariants[0].alerts[0]: 'Queue Stuck' is not an alert name"),
    ({"queries": {"lag": {"promql": "up"}}},
     "options.queries: set prometheus_url to run them against"),
    ({"metrics_url": "file:///etc/passwd"},
     "options.metrics_url: 'file:///etc/passwd' is not an http(s) URL"),
])
def test_a_declaration_mistake_is_an_error_naming_its_key(change: dict[str, Any],
                                                          expected: str) -> None:
    assert expected in error_of(options(**change))


def test_check_config_names_the_whole_key_path(tmp_path: Path) -> None:
    bad = EXAMPLE.read_text().replace("secs => {older_than_s}", "secs => {older_than}")
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    assert problems_of(path) == [
        "$.subjects.pg.options.actions.terminate_idle_in_transaction.command.argv[9]: the "
        "template references undeclared parameter(s) older_than (declared: older_than_s)"]


def test_a_service_subject_cannot_be_embedded() -> None:
    with pytest.raises(msgspec.ValidationError, match="kind 'service' is declared in TOML: "
                                                       "menders cannot start it itself"):
        msgspec.convert({"kind": "service", "options": options()}, SubjectConfig)


def test_each_subject_gets_its_own_definition_with_typed_parameters() -> None:
    cfg = msgspec.convert({"kind": "service", "embedded": False, "options": options()},
                          SubjectConfig)
    definition = subjects.definition_of(cfg)
    assert definition is subjects.definition_of(cfg)  # one per subject, shared
    assert [i.name for i in definition.invariants] == ["queue_short"]
    spec = definition.actions["drain"]
    assert spec.validate({"count": 4}).count == 4  # type: ignore[attr-defined]
    for bad in ({"count": 0}, {"count": "4"}, {"count": 4, "extra": 1}, {}):
        with pytest.raises(ActionError):
            spec.validate(bad)
    assert spec.json_schema()["$defs"]["drain_params"]["properties"]["count"] == {
        "type": "integer", "minimum": 1, "maximum": 10}
    other = msgspec.convert({"kind": "service", "embedded": False,
                             "options": options(actions={}, runbooks=[])}, SubjectConfig)
    assert subjects.definition_of(other).actions == {}


def test_a_pattern_is_matched_whole_and_a_trailing_newline_does_not_pass() -> None:
    cfg = msgspec.convert({"kind": "service", "embedded": False, "options": options(
        actions={"restart": {"description": "r", "systemd": {"unit": "app@{n}.service",
                                                              "verb": "restart"},
                             "params": {"n": {"type": "str", "pattern": "[a-z]+"}}}},
        runbooks=[])}, SubjectConfig)
    spec = subjects.definition_of(cfg).actions["restart"]
    assert spec.validate({"n": "blue"})
    for bad in ("blue\n", "x; rm -rf /", "-force", "blue green", ""):
        with pytest.raises(ActionError):
            spec.validate({"n": bad})


def test_templates_take_bare_names_only_and_json_keeps_types() -> None:
    assert templates.fields("a {x} b {{literal}} {y}") == ["x", "y"]
    for bad in ("{x.y}", "{x[0]}", "{x!r}", "{x:>4}", "{", "{0}"):
        with pytest.raises(templates.TemplateError):
            templates.fields(bad)
    body = {"n": "{n}", "note": "n is {n}", "on": "{on}", "list": ["{n}"], "k": 1}
    assert templates.render_json(body, {"n": 3, "on": True}) == {
        "n": 3, "note": "n is 3", "on": True, "list": [3], "k": 1}


def test_a_prometheus_reply_is_reduced_as_declared() -> None:
    def vector(*values: float) -> dict[str, Any]:
        return {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"i": str(i)}, "value": [time.time(), str(v)]}
            for i, v in enumerate(values)]}}

    assert query_value(vector(1, 5, 2), PromQuery(promql="x", reduce="max")) == 5
    assert query_value(vector(1, 5, 2), PromQuery(promql="x", reduce="sum")) == 8
    assert query_value(vector(1, 5), PromQuery(promql="x", reduce="avg")) == 3
    assert query_value(vector(), PromQuery(promql="x", reduce="count")) == 0
    assert query_value(vector(), PromQuery(promql="x")) == 0.0  # the declared empty value
    assert query_value(vector(), PromQuery(promql="x", empty=None)) is None
    assert query_value(vector(float("nan"), 2), PromQuery(promql="x", reduce="min")) == 2
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [0, "0.25"]}}
    assert query_value(scalar, PromQuery(promql="x")) == 0.25
    for bad in ({"status": "error", "error": "parse error"}, [],
                {"status": "success", "data": {"resultType": "matrix", "result": []}},
                {"status": "success", "data": {"resultType": "vector", "result": [{}]}}):
        with pytest.raises(SourceError):
            query_value(bad, PromQuery(promql="x"))


# --- against real local processes and servers ----------------------------------------


@pytest.fixture
async def service() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A local service: /metrics, /health and an action endpoint that records its calls."""
    calls: list[dict[str, Any]] = []
    state = {"healthy": True}

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text="# TYPE jobs_queued gauge\njobs_queued{q=\"a\"} 3\n"
                                 "jobs_queued{q=\"b\"} 4\n# TYPE jobs_done_total counter\n"
                                 f"jobs_done_total {int(time.monotonic() * 10)}\n")

    async def health(_request: web.Request) -> web.Response:
        return web.Response(status=200 if state["healthy"] else 503)

    async def act(request: web.Request) -> web.Response:
        calls.append({"path": request.path, "auth": request.headers.get("Authorization"),
                      "body": await request.json()})
        if request.path.endswith("/refuse"):
            return web.Response(status=409, text="not now")
        return web.Response(status=202, text="queued")

    async def sick(_request: web.Request) -> web.Response:
        state["healthy"] = False
        return web.Response()

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/health", health),
                    web.post("/jobs/{name}", act), web.post("/sick", sick)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", calls
    finally:
        await runner.cleanup()


@pytest.mark.e2e
async def test_the_observer_scrapes_metrics_health_and_log(
        service: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    url, _ = service
    log = tmp_path / "app.log"
    log.write_text("")
    opts = msgspec.convert({
        "metrics_url": f"{url}/metrics", "health_url": f"{url}/health",
        "metrics": {"queued": {"name": "jobs_queued"},
                    "queued_b": {"name": "jobs_queued", "labels": {"q": "b"}},
                    "done_per_s": {"name": "jobs_done_total", "rate": True}}},
        ServiceOptions)
    observer = ServiceObserver(opts, log)
    try:
        first = await observer.scrape()
        assert first["up"] and first["error"] == ""
        assert first["metrics"]["queued"] == 7 and first["metrics"]["queued_b"] == 4
        assert first["metrics"]["health_ok"] == 1 and first["metrics"]["health_ms"] > 0
        with log.open("a") as f:
            f.write('{"level":"error","msg":"db gone"}\n')
        await asyncio.sleep(0.3)
        second = await observer.scrape()
        assert 5 < second["metrics"]["done_per_s"] < 20  # 10 per second, over the interval
        assert second["log_lines"] == ['{"level":"error","msg":"db gone"}']
        import aiohttp
        async with aiohttp.ClientSession() as s:
            await s.post(f"{url}/sick")
        sick = await observer.scrape()
        assert not sick["up"] and sick["metrics"]["health_ok"] == 0
        assert "health_url: SourceError: HTTP 503" in sick["error"]
        assert sick["metrics"]["queued"] == 7  # the other sources still count
    finally:
        await observer.close()


@pytest.mark.e2e
async def test_an_unreachable_prometheus_leaves_its_metrics_out_and_says_why() -> None:
    opts = msgspec.convert({"prometheus_url": "http://127.0.0.1:9", "timeout_s": 0.5,
                            "queries": {"lag": {"promql": "max(lag)"}}}, ServiceOptions)
    observer = ServiceObserver(opts, None)
    try:
        scraped = await observer.scrape()
    finally:
        await observer.close()
    assert not scraped["up"] and scraped["metrics"] == {}
    assert scraped["error"].startswith("query lag: ClientConnectorError")


def client_for(actions: dict[str, Any]) -> tuple[ServiceActionClient, dict[str, Any]]:
    opts = msgspec.convert({"health_url": "http://127.0.0.1:1/", "actions": actions},
                           ServiceOptions)
    return ServiceActionClient(opts.actions), opts.actions


@pytest.mark.e2e
async def test_a_command_runs_without_a_shell_with_only_the_allowed_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_TOKEN", "s3cret")
    monkeypatch.setenv("NOT_PASSED", "leak")
    script = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], "
              "'env': sorted(k for k in os.environ if k not in ('LC_CTYPE',)), "
              "'cwd': os.getcwd()}))")
    client, _ = client_for({"show": {
        "description": "show what it got", "params": {
            "who": {"type": "str", "pattern": "[a-z ;$()-]+"}, "n": {"type": "int"}},
        "command": {"argv": [sys.executable, "-c", script.replace("{", "{{").replace(
            "}", "}}"), "{who}", "n={n}"],
                    "cwd": str(tmp_path), "env": ["APP_TOKEN"], "set_env": {"MODE": "x"}}}})
    detail = await client.run("show", {"who": "a b; $(rm -rf x) -f", "n": 2}, 5)
    got = json.loads(detail.split(": ", 1)[1])
    assert got["argv"] == ["a b; $(rm -rf x) -f", "n=2"]  # one argument each, no shell
    assert set(got["env"]) <= {"PATH", "APP_TOKEN", "MODE"} and "APP_TOKEN" in got["env"]
    assert got["cwd"] == str(tmp_path)
    with pytest.raises(ActionError, match="bad parameters"):
        await client.run("show", {"who": "UPPER", "n": 2}, 5)
    await client.close()


@pytest.mark.e2e
async def test_a_command_failing_or_timing_out_fails_and_its_output_is_truncated(
        tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    client, _ = client_for({
        "fail": {"description": "f", "command": {
            "argv": [sys.executable, "-c", "print('x' * 9000); raise SystemExit(3)"],
            "max_output": 100}},
        "hang": {"description": "h", "command": {"argv": [sys.executable, "-c", (
            "import os, subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(60)")]}}})
    with pytest.raises(ActionFailed, match=r"exited 3: x{100}\.\.\. \(8900 more chars\)"):
        await client.run("fail", {}, 5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.run("hang", {}, 1.0)
    assert time.monotonic() - started < 5
    child = int(pidfile.read_text())
    for _ in range(50):  # the whole process group is killed, not only the direct child
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the command's child {child} outlived its timeout")


@pytest.mark.e2e
async def test_an_http_action_renders_its_templates_and_takes_its_secret_from_the_env(
        service: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, calls = service
    monkeypatch.setenv("JOBS_TOKEN", "Bearer t0k3n")
    http = {"url": f"{url}/jobs/{{name}}", "body": {"count": "{count}", "why": "n={count}"},
            "secret_headers": {"Authorization": "JOBS_TOKEN"}}
    params = {"name": {"type": "str", "enum": ["drain", "refuse"]},
              "count": {"type": "int", "min": 1, "max": 9}}
    client, _ = client_for({"jobs": {"description": "j", "params": params, "http": http},
                            "nokey": {"description": "n", "http": {
                                **http, "url": f"{url}/jobs/drain",
                                "secret_headers": {"Authorization": "NO_SUCH_VAR"}},
                                "params": params}})
    try:
        detail = await client.run("jobs", {"name": "drain", "count": 3}, 5)
        assert detail.endswith("HTTP 202: queued")
        assert calls == [{"path": "/jobs/drain", "auth": "Bearer t0k3n",
                          "body": {"count": 3, "why": "n=3"}}]
        with pytest.raises(ActionError, match="HTTP 409: not now") as refused:
            await client.run("jobs", {"name": "refuse", "count": 1}, 5)
        assert refused.value.code == "invalid"
        with pytest.raises(ActionFailed, match="NO_SUCH_VAR"):
            await client.run("nokey", {"name": "drain", "count": 1}, 5)
        assert len(calls) == 2
    finally:
        await client.close()


@pytest.mark.e2e
async def test_a_systemd_action_runs_systemctl_with_the_unit_after_a_double_dash(
        tmp_path: Path) -> None:
    record = tmp_path / "argv.json"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f"#!{sys.executable}\nimport json, sys\n"
                         f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    systemctl.chmod(0o755)
    client, _ = client_for({"restart": {
        "description": "restart one app instance", "risk": "medium", "params": {
            "n": {"type": "str", "pattern": "[a-z]{1,8}"}},
        "systemd": {"unit": "app@{n}.service", "verb": "restart",
                    "systemctl": str(systemctl)}}})
    detail = await client.run("restart", {"n": "blue"}, 5)
    assert detail.startswith(f"{systemctl} exited 0")
    assert json.loads(record.read_text()) == ["--no-ask-password", "restart", "--",
                                              "app@blue.service"]
    with pytest.raises(ActionError):
        await client.run("restart", {"n": "--all"}, 5)
