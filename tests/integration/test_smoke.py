"""A router on a file sink takes single events and batches."""

from pathlib import Path

import httpx

from tests.conftest import read_jsonl, route_doc, router_doc, sink_doc, write_documents


def test_file_sink_receives_events(router_factory, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    config = write_documents(
        tmp_path / "router.yaml",
        [router_doc(), sink_doc("file", file={"path": str(out)}), route_doc("all", ["file"])],
    )
    router = router_factory([config])
    reply = httpx.post(f"{router.url}/v2/event", json={"name": "a", "properties": {"k": "v"}})
    assert reply.status_code == 200
    assert reply.json() == {}
    router.wait_for(lambda: len(read_jsonl(out)) == 1, what="one event in the file")
    event = read_jsonl(out)[0]
    assert event["name"] == "a"
    assert event["properties"] == {"k": "v"}
    assert event["router"] == "test"
