"""The Claude diagnoser's final-diagnosis tool: its schema and how an answer is read."""

from __future__ import annotations

from actors.diagnoser.llm.schema import diagnosis_tool, parse_final
from subjects.kvcluster.definition import DEFINITION


def test_the_tool_offers_multi_step_remedies_of_registered_actions_only() -> None:
    schema = diagnosis_tool(DEFINITION)["input_schema"]
    step = schema["$defs"]["ProposedStep"]
    assert set(step["properties"]["action"]["enum"]) == set(DEFINITION.actions)
    assert set(step["properties"]["mode"]["enum"]) == {"sync", "async", "fire_and_forget"}
    assert "steps" in schema["$defs"]["ProposedAction"]["properties"]


def test_a_multi_step_answer_becomes_one_remedy_vetted_whole() -> None:
    steps = [{"id": "compact", "action": "compact"},
             {"id": "d1", "action": "defragment", "params": {"member": "m1"},
              "depends_on": ["compact"]},
             {"id": "disarm", "action": "disarm_alarm", "depends_on": ["d1"]}]
    raw = {"hypothesis": "NOSPACE", "evidence": ["alarm"], "confidence": 0.8,
           "actions": [{"action": "compact", "remedy": "reclaim", "steps": steps},
                       {"action": "compact", "remedy": "bad", "steps": [
                           {"id": "x", "action": "format_disk"}]}]}
    final = parse_final(raw, DEFINITION)
    [remedy] = final.actions
    assert remedy.action == "reclaim" and not final.escalate
    assert [(s.id, s.action, s.depends_on) for s in remedy.steps] == [
        ("compact", "compact", []), ("d1", "defragment", ["compact"]),
        ("disarm", "disarm_alarm", ["d1"])]
    assert remedy.steps[2].params == {"alarm": "NOSPACE"}  # normalised by the registry
    assert final.refusals == ["dropped remedy 'bad': 'format_disk' is not registered for "
                              "this subject"]
