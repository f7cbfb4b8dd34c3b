"""Raw ASGI app that parses bodies with json.loads and validates them with pydantic v2."""

import json

from asgi_base import make_app
from pydantic import ValidationError
from schemas import PydanticBatch, PydanticEvent

# json.JSONDecodeError and pydantic.ValidationError are both ValueError subclasses.
# UnicodeDecodeError (also a ValueError) covers bodies that are not valid UTF-8.
app = make_app(
    lambda body: PydanticEvent.model_validate(json.loads(body)),
    lambda body: PydanticBatch.model_validate(json.loads(body)),
    (json.JSONDecodeError, UnicodeDecodeError, ValidationError),
)
