"""The demo subject: a small web shop the crew watches and repairs.

Actors import only `definition` (actions, invariants, runbooks, observer,
action client). The service itself (`service`, `server`) and its chaos hooks
(`chaos`) run in the subject's own process and are never imported by an actor.
"""
