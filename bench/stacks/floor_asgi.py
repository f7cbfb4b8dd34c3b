"""Floor: raw ASGI app that parses the body with orjson and skips validation.

Every other candidate does at least this much work per request, so its throughput is
the reference that the other results are divided by.
"""

import orjson
from asgi_base import make_app

app = make_app(orjson.loads, orjson.loads, (orjson.JSONDecodeError,))
