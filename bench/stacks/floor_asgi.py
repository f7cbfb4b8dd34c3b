"""Floor: raw ASGI app that parses the body with orjson and skips validation.

The other uvicorn candidates do at least this much work per request. Its throughput is
the reference that all results are divided by, and candidates on other servers can
exceed it.
"""

import orjson
from asgi_base import make_app

app = make_app(orjson.loads, orjson.loads, (orjson.JSONDecodeError,))
