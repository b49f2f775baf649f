"""Which module implements which actor: `menders run <actor>` imports only that one."""

from __future__ import annotations

import importlib

from actors.runtime import Actor
from bus_schemas import catalog


def actor_class(name: str) -> type[Actor]:
    if name not in catalog.ACTORS:
        raise KeyError(f"unknown actor {name!r}; known: {', '.join(catalog.ACTORS)}")
    module = importlib.import_module(f"actors.{name}.actor")
    cls = module.ACTOR
    assert issubclass(cls, Actor) and cls.name == name
    return cls
