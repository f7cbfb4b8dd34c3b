"""The Dockerfile and requirements.lock, checked without building: Docker cannot run here.

The checks cover what a build would trip over or a cluster would reject: the
instructions parse, the image runs the `eventrouter` console script as user
10001, the commands that the chart and the operator pass it exist, and the
lock pins, with hashes, every dependency that pyproject.toml declares.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from eventrouter import __version__
from eventrouter.cli import _parser
from eventrouter.resources import EventRouter
from eventrouter_operator.builders import DEFAULT_IMAGE, Resolution, build_objects
from tests.chart.conftest import CHART, Helm, find
from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


@dataclass
class Instruction:
    line: int
    name: str
    value: str

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD, ENTRYPOINT or RUN, as a list of strings."""
        parsed = json.loads(self.value)
        assert isinstance(parsed, list), f"line {self.line}: {self.name} is not a JSON list"
        assert all(isinstance(part, str) for part in parsed)
        return parsed


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining lines that end with a backslash.

    Comment lines are dropped, also inside a continued instruction, as
    BuildKit does. Fails on a word that is not an instruction.
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        continued = line.endswith("\\")
        pending.append(line[:-1].strip() if continued else line)
        if continued:
            continue
        name, _, value = " ".join(pending).partition(" ")
        assert name.upper() in INSTRUCTIONS, f"line {start}: unknown instruction {name!r}"
        instructions.append(Instruction(start, name.upper(), value.strip()))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage, each starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.name == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def labels(stage: list[Instruction]) -> dict[str, str]:
    found: dict[str, str] = {}
    for instruction in stage:
        if instruction.name == "LABEL":
            for pair in shlex.split(instruction.value):
                key, _, value = pair.partition("=")
                found[key] = value
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dockerfile_is_multi_stage(dockerfile: list[Instruction]) -> None:
    built = stages(dockerfile)

    assert len(built) >= 2
    assert built[0][0].value.split()[-2:] == ["AS", "build"]
    final_copies = [i.value for i in built[-1] if i.name == "COPY"]
    assert any(value.startswith("--from=build ") for value in final_copies)
    # The final stage copies only the built virtual environment.
    assert all(value.startswith("--from=build ") for value in final_copies)


def test_dockerfile_runs_as_non_root_user(dockerfile: list[Instruction]) -> None:
    final = stages(dockerfile)[-1]
    users = [i.value for i in final if i.name == "USER"]

    assert users == ["10001:10001"]
    # The operator's pod specs and the chart run pods as the same user.
    router_pod = _router_pod_spec()
    assert router_pod["securityContext"]["runAsUser"] == 10001
    assert router_pod["securityContext"]["runAsGroup"] == 10001


def _router_pod_spec() -> dict[str, Any]:
    """The pod spec that the operator builds for a router with default settings."""
    body = {
        "apiVersion": "eventrouter.io/v1alpha1",
        "kind": "EventRouter",
        "metadata": {"name": "game", "namespace": "games", "uid": "0"},
        "spec": {},
    }
    router = EventRouter.model_validate(body)
    resolution = Resolution(router=router, router_error=None, config_text="{}\n")
    deployment = find(build_objects(body, resolution), "Deployment")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def test_dockerfile_entrypoint_is_console_script(
    dockerfile: list[Instruction], pyproject: dict[str, Any]
) -> None:
    final = stages(dockerfile)[-1]
    entrypoint = [i for i in final if i.name == "ENTRYPOINT"][-1].exec_form()
    command = [i for i in final if i.name == "CMD"][-1].exec_form()

    assert entrypoint == ["eventrouter"]
    assert pyproject["project"]["scripts"]["eventrouter"] == "eventrouter.cli:main"
    assert _parser().parse_args(command).command == "serve"


def test_router_container_args_parse() -> None:
    container = _router_pod_spec()["containers"][0]

    # The operator sets args only, so the image's ENTRYPOINT runs them.
    assert container["image"] == DEFAULT_IMAGE
    assert "command" not in container
    args = _parser().parse_args(container["args"])
    assert args.command == "serve"
    assert args.host == "0.0.0.0"


def test_operator_container_command_parses(helm: Helm) -> None:
    for values in ([], ["--set", "operator.clusterWide=true"]):
        documents = helm.template("eventrouter", *values)
        deployment = find(documents, "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]

        assert container["command"] == ["eventrouter"]
        args = _parser().parse_args(container["args"])
        assert args.command == "operator"
        assert args.liveness == "http://0.0.0.0:8080/healthz"


def test_image_versions_agree(dockerfile: list[Instruction], pyproject: dict[str, Any]) -> None:
    import yaml

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    image_labels = labels(stages(dockerfile)[-1])
    repository, _, tag = DEFAULT_IMAGE.rpartition(":")

    assert chart["appVersion"] == pyproject["project"]["version"] == __version__
    assert image_labels["org.opencontainers.image.version"] == chart["appVersion"]
    assert image_labels["org.opencontainers.image.title"] == "eventrouter"
    assert tag == chart["appVersion"]
    assert values["image"]["repository"] == repository
    assert values["image"]["tag"] == ""
    assert f"docker build -t {DEFAULT_IMAGE} ." in DOCKERFILE.read_text()


def test_dockerfile_installs_lock_with_hashes(dockerfile: list[Instruction]) -> None:
    build = stages(dockerfile)[0]
    runs = [i.value for i in build if i.name == "RUN"]
    copies = [i.value for i in build if i.name == "COPY"]

    assert "requirements.lock ./" in copies
    assert any("--require-hashes" in run and "-r requirements.lock" in run for run in runs)
    # Only the package itself is installed without hashes, and with --no-deps.
    assert any("--no-deps /tmp/dist/eventrouter-" in run and "pip check" in run for run in runs)


def test_dockerignore_keeps_copied_paths(dockerfile: list[Instruction]) -> None:
    kept = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = set()
    for instruction in dockerfile:
        if instruction.name == "COPY" and not instruction.value.startswith("--from="):
            sources.update(p.rstrip("/") for p in instruction.value.split()[:-1])

    assert sources == kept
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} does not exist"


def _locked() -> dict[str, tuple[Version, int]]:
    """Each package of requirements.lock with its pinned version and number of hashes."""
    locked: dict[str, tuple[Version, int]] = {}
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = line.split(" --hash=")
        pin = Requirement(requirement.strip())
        (specifier,) = pin.specifier
        assert specifier.operator == "==", f"{pin.name} is not pinned with ==: {line[:80]}"
        locked[pin.name.lower().replace("_", "-")] = (Version(specifier.version), len(options))
    return locked


def test_lock_pins_every_package_with_hashes() -> None:
    locked = _locked()

    assert locked
    for name, (_, hashes) in locked.items():
        assert hashes >= 1, f"{name} has no --hash in requirements.lock"


def test_lock_covers_pyproject_dependencies(pyproject: dict[str, Any]) -> None:
    locked = _locked()

    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        name = requirement.name.lower().replace("_", "-")
        assert name in locked, (
            f"{name} is in pyproject.toml but not in requirements.lock; regenerate it with "
            "the pip-compile command in its header"
        )
        version, _ = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside {requirement.specifier}"
        )
