"""Event schemas shared by the benchmark servers in this directory.

Every validating candidate enforces the same rules, so that the benchmark compares
servers and JSON libraries and not the amount of checking:

- ``name`` is a required, non-empty string.
- ``properties`` is an optional object whose keys and values are strings.
- ``timestamp`` is an optional RFC 3339 date-time, parsed to ``datetime``.
- ``external`` is an optional boolean.
- A batch is ``{"events": [...]}`` with at least one event.

Unknown fields are ignored.
"""

from datetime import datetime
from typing import Annotated

import msgspec
from pydantic import BaseModel, Field, StrictBool, StrictStr

OK_BODY = b"{}"
INVALID_BODY = b'{"error":"invalid request body"}'


class MsgspecEvent(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    properties: dict[str, str] = {}
    timestamp: datetime | None = None
    external: bool = False


class MsgspecBatch(msgspec.Struct):
    events: Annotated[list[MsgspecEvent], msgspec.Meta(min_length=1)]


# Strict types make pydantic reject what msgspec rejects (5 for a string, "true" for a
# boolean). The timestamp stays lax because strict mode rejects strings for datetime
# when validating the dict that json.loads returns.
class PydanticEvent(BaseModel):
    name: Annotated[StrictStr, Field(min_length=1)]
    properties: dict[StrictStr, StrictStr] = {}
    timestamp: datetime | None = None
    external: StrictBool = False


class PydanticBatch(BaseModel):
    events: Annotated[list[PydanticEvent], Field(min_length=1)]


msgspec_event_decoder = msgspec.json.Decoder(MsgspecEvent)
msgspec_batch_decoder = msgspec.json.Decoder(MsgspecBatch)
