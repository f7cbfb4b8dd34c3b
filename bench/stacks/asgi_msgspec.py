"""Raw ASGI app that decodes bodies into typed msgspec Structs."""

import msgspec
from asgi_base import make_app
from schemas import msgspec_batch_decoder, msgspec_event_decoder

app = make_app(
    msgspec_event_decoder.decode,
    msgspec_batch_decoder.decode,
    (msgspec.DecodeError,),
)
