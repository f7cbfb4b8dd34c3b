"""Request bodies for the HTTP stack benchmark.

The events look like what a game client sends to Nakama's ``POST /v2/event``: a name,
a few string properties and an RFC 3339 timestamp. The generator is deterministic, so
every run sends the same bytes.
"""

import json

BATCH_SIZE = 50

_NAMES = ["level_up", "match_start", "match_end", "item_purchase", "quest_complete"]
_CLASSES = ["mage", "warrior", "rogue", "cleric"]
_ZONES = ["frost_peaks", "ember_vale", "sunken_keep", "old_harbor"]


def make_event(index: int) -> dict[str, object]:
    """Build the event with the given index. Its JSON encoding is about 200 bytes."""
    return {
        "name": _NAMES[index % len(_NAMES)],
        "properties": {
            "level": str(5 + index % 60),
            "class": _CLASSES[index % len(_CLASSES)],
            "zone": _ZONES[index % len(_ZONES)],
            "session_id": f"3f2b9c1e-7a4d-4e8b-9c0a-{index:012d}",
            "build": "1.42.0",
        },
        "timestamp": f"2026-12-04T10:{index // 60 % 60:02d}:{index % 60:02d}Z",
    }


def encode(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def single_event_body() -> bytes:
    return encode(make_event(0))


def batch_body(size: int = BATCH_SIZE) -> bytes:
    return encode({"events": [make_event(i) for i in range(size)]})
