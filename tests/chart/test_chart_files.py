"""The chart's files against their sources: CRDs, README, values and schema.

crds/ contains the CRDs generated from the resource models; the chart carries
copies because Helm reads CRDs only from the chart's own crds/ folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any, get_args

import jsonschema
import pytest
import yaml
from kopf._cogs.structs import references

from eventrouter.resources import EventRoute, EventSink, QueueSpec
from tests.chart.conftest import CHART
from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "generate-chart-readme.py"
KOPF_PEERINGS = CHART / "crds" / "kopf-peerings.yaml"


def _generator() -> Any:
    """scripts/generate-chart-readme.py as a module (its name has dashes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_chart_readme", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "crds").glob("*.yaml")))
def test_chart_crd_matches_repository(name: str) -> None:
    copy = CHART / "crds" / name

    assert copy.is_file(), f"{copy} is missing; run cp crds/*.yaml charts/eventrouter/crds/"
    assert copy.read_text() == (REPO / "crds" / name).read_text(), (
        f"{copy} differs from crds/{name}; run cp crds/*.yaml charts/eventrouter/crds/"
    )


def test_chart_crds_are_known() -> None:
    expected = {p.name for p in (REPO / "crds").glob("*.yaml")} | {KOPF_PEERINGS.name}

    assert {p.name for p in (CHART / "crds").iterdir()} == expected


def test_kopf_peering_crds_match_kopf() -> None:
    documents = [d for d in yaml.safe_load_all(KOPF_PEERINGS.read_text()) if d]
    by_scope = {d["spec"]["scope"]: d["spec"] for d in documents}

    for scope, selector in (
        ("Cluster", references.CLUSTER_PEERINGS_K),
        ("Namespaced", references.NAMESPACED_PEERINGS_K),
    ):
        spec = by_scope[scope]
        assert spec["group"] == selector.group
        assert spec["versions"][0]["name"] == selector.version
        assert spec["names"]["plural"] == selector.any_name
        status = spec["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        # kopf keeps one key per operator pod in the status.
        assert status["x-kubernetes-preserve-unknown-fields"] is True


def test_chart_readme_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr


def test_readme_generator_rejects_undocumented_value() -> None:
    generator = _generator()
    text = "image:\n  # -- Image repository.\n  repository: example\n  tag: latest\n"

    with pytest.raises(generator.UndocumentedValueError, match=r"line 4: image\.tag"):
        generator.documented_values(text)


def test_readme_generator_reads_multi_line_comment() -> None:
    generator = _generator()
    text = "# -- First line\n# and second line.\nresources:\n  limits: {}\n"

    values = generator.documented_values(text)

    assert [(v.path, v.description) for v in values] == [
        ("resources", "First line and second line.")
    ]


def _schema_node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.split("."):
        node = node["properties"][part]
    return node


def test_every_value_is_documented_in_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())

    values = _generator().documented_values(text)

    assert len(values) > 30
    for value in values:
        node = _schema_node(schema, value.path)
        assert node.get("description"), f"{value.path} has no description in the schema"
        assert node.get("type"), f"{value.path} has no type in the schema"


def _objects(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if node.get("type") == "object" and "properties" in node:
        found.append((path or "(root)", node))
    for name, child in node.get("properties", {}).items():
        found += _objects(child, f"{path}.{name}" if path else name)
    return found


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    jsonschema.Draft7Validator.check_schema(schema)
    for path, node in _objects(schema):
        assert node.get("additionalProperties") is False, f"{path} allows unknown keys"


def test_values_match_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    jsonschema.validate(values, schema)
    for path in sorted((CHART / "ci").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_schema_enums_cover_defaults() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    assert _schema_node(schema, "image.pullPolicy")["enum"] == ["Always", "IfNotPresent", "Never"]
    # The chart offers every overflow policy the router accepts.
    policies = list(get_args(QueueSpec.model_fields["overflow"].annotation))
    assert _schema_node(schema, "defaultRouter.queue.overflow")["enum"] == policies
    assert policies == ["dropNewest", "dropOldest", "reject", "block"]
    assert _schema_node(schema, "defaultRouter.logStream")["enum"] == ["stdout", "stderr"]


def test_install_doc_resources_validate() -> None:
    text = (REPO / "docs" / "install.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    documents = [d for block in blocks for d in yaml.safe_load_all(block) if d]
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    assert [d["kind"] for d in documents] == ["EventSink", "EventRoute"]
    sink = EventSink.model_validate(documents[0])
    route = EventRoute.model_validate(documents[1])
    assert sink.spec.kafka is not None
    assert route.spec.router == values["defaultRouter"]["name"]
    assert route.spec.sinks == [sink.metadata.name]
