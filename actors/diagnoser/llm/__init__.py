"""Claude in menders: the diagnoser's investigation loop and incident summaries.

prompt.py   the system prompt and how untrusted data is delimited
schema.py   the final diagnosis tool (schema from a msgspec Struct) and its checks
usage.py    tokens, estimated cost, request outcomes as Prometheus counters
client.py   one Messages API call with the second layer of retries
claude.py   ClaudeDiagnoser: the bounded tool-use loop, runbooks as fallback
summary.py  a small model's one-paragraph summary of a closed incident

Whatever Claude says is a proposal: registered actions with valid parameters
only (checked here and again by the planner), then the governor's policy.
"""
