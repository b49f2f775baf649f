"""The ratelimiter's definitions, without servers: catalog, runbooks, options, observer maths."""

from __future__ import annotations

from typing import Any

import pytest

from actors.runtime.config import ConfigError, load
from subjects import load as load_kind
from subjects.ratelimiter.definition import DEFINITION
from subjects.ratelimiter.faults import FAULTS
from subjects.ratelimiter.observer import RatelimiterObserver
from subjects.rules import check_rules, match_condition


def test_the_fault_catalog_names_exactly_the_chaos_hooks_and_real_cures() -> None:
    from subjects.ratelimiter.chaos import Chaos, Fault

    def leaves(cls: type) -> set[type]:
        subs = set(cls.__subclasses__())
        return {c for s in subs for c in (leaves(s) or {s})}

    hooks = {c.name for c in leaves(Fault)}
    assert {f.name for f in FAULTS} == hooks
    assert set(Chaos.__init__.__code__.co_names) >= {c.__name__ for c in leaves(Fault)}
    assert [f.name for f in FAULTS if not f.fixable] == ["data_corrupted"]
    names = {inv.name for inv in DEFINITION.invariants}
    assert {f.invariant for f in FAULTS} == names  # every invariant has a fault that breaks it
    for f in FAULTS:
        for action, params in ([f.right] if f.right else []) + list(f.wrong):
            DEFINITION.actions[action].validate(params)
        assert f.right not in f.wrong


def test_runbooks_name_known_invariants_valid_actions_and_parseable_conditions() -> None:
    names = {inv.name for inv in DEFINITION.invariants}
    assert not check_rules(DEFINITION.runbooks)
    for rule in DEFINITION.runbooks:
        assert rule.invariant in names, rule.name
        assert rule.escalate != bool(rule.actions), rule.name
        for step in rule.actions:
            DEFINITION.actions[step.action].validate(dict(step.params))
        for cond in rule.when.values():
            match_condition(1.0, cond)
    assert [r.name for r in DEFINITION.runbooks if r.escalate] == ["redis_data_lost"]
    assert not DEFINITION.actions["restart_node"].idempotent
    assert load_kind("ratelimiter") is DEFINITION


def _write(tmp_path: Any, text: str) -> str:
    path = tmp_path / "menders.toml"
    path.write_text(text)
    return str(path)


def test_a_ratelimiter_subject_is_expressible_in_config_with_its_own_options(
        tmp_path: Any) -> None:
    cfg = load(_write(tmp_path, '[subjects.rl]\nkind = "ratelimiter"\n'
                                'url = "http://127.0.0.1:8090"\n'
                                '[subjects.rl.options]\nnodes = 3\nwindow_s = 2.0\n'
                                '[subjects.rl.options.clients.web]\nlimit = 5\nrps = 3\n'))
    assert cfg.subjects["rl"].kind == "ratelimiter"
    assert cfg.subjects["rl"].options["clients"]["web"]["limit"] == 5


@pytest.mark.parametrize(("options", "needle"), [
    ("nodes = 12", "options.nodes"),
    ("window_s = \"fast\"", "options.window_s"),
    ("colour = 1", "colour"),
    ("[subjects.rl.options.clients.web]\nlimit = 0\nrps = 1", "limit"),
])
def test_bad_ratelimiter_options_fail_naming_the_key(tmp_path: Any, options: str,
                                                      needle: str) -> None:
    text = f'[subjects.rl]\nkind = "ratelimiter"\n[subjects.rl.options]\n{options}\n'
    with pytest.raises(ConfigError, match=needle):
        load(_write(tmp_path, text))


def test_webshop_takes_no_options(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="takes no options"):
        load(_write(tmp_path, '[subjects.shop]\nkind = "webshop"\n[subjects.shop.options]\n'
                              'x = 1\n'))


def _node(allowed: dict[str, float]) -> tuple[dict[str, Any], dict[Any, float]]:
    health = {"build": "1.4.2", "store": "redis"}  # every node says it is fine
    samples = {("ratelimiter_decisions_total", (("client", c), ("decision", "allowed"))): v
               for c, v in allowed.items()}
    return health, samples


def _primary(tally: dict[str, float]) -> dict[str, Any]:
    return {"ping_ms": 0.2, "info": {"role": "master"}, "clients": [
        {"name": f"rl-node-{i}"} for i in (1, 2, 3)], "limits": {"scraper": 5.0, "web": 40.0},
        "tally": tally, "counters": {"rl:w:scraper": (-1.0, 2000.0), "rl:w:web": (900.0, 3.0)}}


def test_ghost_allowing_and_drift_are_measured_from_counts_not_from_what_nodes_say() -> None:
    obs = RatelimiterObserver("http://127.0.0.1:1", None)
    per_node = [0.0, 0.0, 0.0]
    tally = 0.0
    m: dict[str, float] = {}
    for step in range(4):  # one scrape a second; each node allows 4 scraper requests a second
        per_node = [v + 4 for v in per_node] if step else per_node
        tally += 12 if step else 0
        nodes = {f"node-{i + 1}": _node({"scraper": v}) for i, v in enumerate(per_node)}
        m = obs._metrics(nodes, _primary({"scraper": tally}), {"master_link_status": "up"},
                         1.0, float(step))
    assert m["ghost_ratio"] == pytest.approx(12 / 5)  # 12/s allowed against 5 per second
    assert m["counter_drift"] == pytest.approx(0.0)
    assert m["over_limit_keys"] == 1 and m["counters_without_ttl"] == 1
    assert m["redis_disconnected_nodes"] == 0 and m["nodes_down"] == 0
    # Redis recorded only two thirds of what the nodes allowed: drift.
    nodes = {f"node-{i + 1}": _node({"scraper": v + 4}) for i, v in enumerate(per_node)}
    m = obs._metrics(nodes, _primary({"scraper": tally + 8}), None, 1.0, 4.0)
    assert m["counter_drift"] > 0.05 and m["redis_replica_up"] == 0
