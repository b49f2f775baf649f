"""JSON encoding and typed decoding of bus messages.

One Decoder per consumer, built once, over the tagged union of the schemas
that consumer may receive. Anything else is a DecodeError whose text says
what is wrong; the runtime dead-letters it.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Union

import msgspec

from bus_schemas.errors import MendersError
from bus_schemas.messages import ALL_MESSAGES, Event

_encoder = msgspec.json.Encoder()


class DecodeError(MendersError, ValueError):
    """A payload that is not a valid message for the consumer that received it."""


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


@cache
def decoder_for(schemas: tuple[type[Event], ...]) -> msgspec.json.Decoder[Any]:
    if not schemas:
        raise ValueError("a decoder needs at least one schema")
    union: Any = schemas[0] if len(schemas) == 1 else Union[schemas]  # noqa: UP007
    return msgspec.json.Decoder(union)


def decode(payload: bytes, schemas: tuple[type[Event], ...] = ALL_MESSAGES) -> Event:
    try:
        event: Event = decoder_for(schemas).decode(payload)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}") from None
    except RecursionError:
        # msgspec recurses per nesting level, even into a field it skips: a payload of
        # a few thousand brackets would otherwise crash the consumer on every delivery
        raise DecodeError("malformed JSON: nested too deeply") from None
    return event
