"""Raw ASGI app that parses and validates bodies in one step with pydantic v2.

``model_validate_json`` parses the JSON in pydantic-core (Rust) without building an
intermediate dict. The pydantic performance tips
(https://docs.pydantic.dev/latest/concepts/performance/) recommend it over
``model_validate(json.loads(...))``.
"""

from asgi_base import make_app
from pydantic import ValidationError
from schemas import PydanticBatch, PydanticEvent

app = make_app(
    PydanticEvent.model_validate_json,
    PydanticBatch.model_validate_json,
    (ValidationError,),
)
