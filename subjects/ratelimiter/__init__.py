"""A Redis-backed rate limiter: three limiter nodes on one real redis-server (plus a replica).

Actors import only `definition` (actions, invariants, runbooks, observer,
action client). The cluster manager (`cluster`), the limiter nodes (`node`)
and the chaos hooks (`chaos`) run in the subject's own processes and are
never imported by an actor.
"""
