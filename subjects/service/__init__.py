"""The `service` kind: a subject declared in TOML alone, for a service menders did not write.

Everything a built-in kind says in Python, a `[subjects.<name>.options]` table says here:
where the observations come from (PromQL queries against a Prometheus, a /metrics URL,
a health URL, and the subject's `log_path`), its invariants and runbook rules (the same
Structs and checks as the built-in kinds), and its actions (`http`, `command` and
`systemd`), each with a typed parameter schema. Every template is checked against the
declared parameters when the config loads, so a typo fails at start-up, not at 3 am.
"""
