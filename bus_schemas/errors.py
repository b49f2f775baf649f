"""The root of menders' own errors.

Every error menders raises on purpose derives from `MendersError`, so a caller
can tell "menders refused, and says why" from a bug; the CLI maps each class
to an exit code in one table (actors/cli/main.py). It lives here because every
package may import bus_schemas, and bus_schemas imports nothing else of ours.
"""

from __future__ import annotations


class MendersError(Exception):
    """An error whose message is meant for a human: what went wrong and what to do."""
