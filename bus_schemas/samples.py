"""One deterministic, valid instance of every message: required fields filled in.

The bus contract's tests check each message with it, the delivery tests and the
bus fuzzer (bench/fuzz_bus.py) start their payloads from it.
"""

from __future__ import annotations

from typing import Any

import msgspec.inspect as mi

from bus_schemas import messages as m


def sample(cls: type[m.Event], subject: str = "webshop") -> m.Event:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    values: dict[str, Any] = {"subject": subject}
    for f in info.fields:
        if not f.required:
            continue
        values[f.name] = _value(f.type, f.name)
    if "actor" in {f.name for f in info.fields}:
        values["actor"] = "diagnoser"
    return cls(**values)


def _value(t: mi.Type, name: str) -> Any:
    match t:
        case mi.StrType():
            return f"{name}-1"
        case mi.IntType():
            return 7
        case mi.FloatType():
            return 1.5
        case mi.BoolType():
            return True
        case mi.LiteralType(values=values):
            return values[0]
        case mi.ListType(item_type=item):
            return [_value(item, name)]
        case mi.StructType(cls=cls):
            info = mi.type_info(cls)
            assert isinstance(info, mi.StructType)
            return cls(**{f.name: _value(f.type, f.name) for f in info.fields if f.required})
    raise NotImplementedError(t)
