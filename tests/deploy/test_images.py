"""The container images: hadolint, the image rules hadolint does not cover, .dockerignore, the probe.

No Docker engine runs here: the Dockerfiles are linted and parsed, never built.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from .support import DEPLOY, REPO, tool

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def _instructions(path: Path) -> list[dict]:
    with path.open("rb") as fh:
        return [i for i in DockerfileParser(fileobj=fh).structure if i["instruction"] != "COMMENT"]


def _stages(path: Path) -> list[list[dict]]:
    """The instructions of each build stage, each list starting with its FROM."""
    stages: list[list[dict]] = []
    for instruction in _instructions(path):
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _final(path: Path, name: str) -> list[str]:
    return [i["value"] for i in _stages(path)[-1] if i["instruction"] == name]


def _external_bases(path: Path) -> list[str]:
    with path.open("rb") as fh:
        parser = DockerfileParser(fileobj=fh)
        images = parser.parent_images
    stage_names = {
        i["value"].split()[-1]
        for i in _instructions(path)
        if i["instruction"] == "FROM" and " AS " in i["value"].upper()
    }
    return [image for image in images if image not in stage_names]


def test_both_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = subprocess.run(
        [str(tool("hadolint")), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_to_an_exact_version(dockerfile: Path) -> None:
    bases = _external_bases(dockerfile)
    assert bases, "no base image found"
    for image in bases:
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and any(c.isdigit() for c in tag.split("-")[0]), f"{image}: tag is not a version"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_with_a_runtime_stage_that_builds_nothing(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 2
    final_runs = " ".join(_final(dockerfile, "RUN"))
    assert "pip install" not in final_runs, "the runtime stage copies the venv; it installs nothing"
    assert any("--from=build" in v for v in _final(dockerfile, "COPY"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = _final(dockerfile, "USER")
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_has_a_healthcheck_on_the_live_path(dockerfile: Path) -> None:
    checks = _final(dockerfile, "HEALTHCHECK")
    assert len(checks) == 1 and "healthcheck.py" in checks[0] and "/health" in checks[0]
    assert any("deploy/docker/healthcheck.py" in v for v in _final(dockerfile, "COPY"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_server_listens_on_all_interfaces_with_data_on_volumes(dockerfile: Path) -> None:
    env = " ".join(_final(dockerfile, "ENV"))
    for setting in (
        "DELTASERVE_HOST=0.0.0.0",
        "DELTASERVE_MODEL_CACHE=/data/models",
        "DELTASERVE_REGISTRY_DIR=/data/registry",
        "DELTASERVE_WORK_DIR=/data/work",
    ):
        assert setting in env
    volumes = set(json.loads(_final(dockerfile, "VOLUME")[0]))
    assert {"/data/models", "/data/registry", "/data/work"} <= volumes
    assert _final(dockerfile, "ENTRYPOINT") == ['["deltaserve"]'] and _final(dockerfile, "CMD") == ['["serve"]']


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_model_is_baked_in_by_default(dockerfile: Path) -> None:
    args = [i["value"] for i in _instructions(dockerfile) if i["instruction"] == "ARG"]
    assert "BAKE_MODEL=0" in args


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for instruction in _instructions(dockerfile):
        words = instruction["value"].split()
        if instruction["instruction"] == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest(dockerfile: Path) -> None:
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for source in _copy_sources(dockerfile):
        assert (REPO / source).exists(), f"COPY {source}: no such path"
        assert not _ignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
    for heavy in (".venv", ".git", "tests", "bench/results", "server/__pycache__/x.pyc"):
        assert _ignored(heavy, patterns), f"{heavy} would be sent to the build context"


def _build_stage_copies(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of each COPY from the build context in the `build` stage."""
    stage = next(st for st in _stages(dockerfile) if st[0]["value"].split()[-1] == "build")
    copies = []
    for instruction in stage:
        words = instruction["value"].split()
        if instruction["instruction"] == "COPY":
            copies += [(source, words[-1]) for source in words[:-1]]
    return copies


def test_both_images_install_from_the_same_sources() -> None:
    cpu, cuda = (_build_stage_copies(d) for d in DOCKERFILES)
    assert cpu == cuda


def test_what_the_build_stage_copies_builds_the_package(tmp_path: Path) -> None:
    """`pip install .` in the image sees only the copied paths: they must make a complete package."""
    for source, dest in _build_stage_copies(DOCKERFILES[0]):
        target = tmp_path / "src" / dest
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / source, target)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(tmp_path / "src"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    wheel = next((tmp_path / "dist").glob("deltaserve-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        scripts = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "deltaserve = server.cli:main" in scripts
    assert {"server/cli.py", "server/app.py", "compressor/__init__.py", "kernels/__init__.py"} <= names


class _Server(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture()
def local_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _probe(path: str, port: int) -> int:
    env = {"DELTASERVE_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(HEALTHCHECK), path], env=env, timeout=30).returncode


def test_healthcheck_script_exits_0_on_200_and_1_otherwise(local_server: int) -> None:
    assert _probe("/health", local_server) == 0
    assert _probe("/ready", local_server) == 1


def test_healthcheck_script_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    assert _probe("/health", closed_port) == 1


def _runtime_lineage_runs(dockerfile: Path) -> str:
    """RUN text of the runtime stage and of every stage it is built FROM, inside this Dockerfile."""
    stages = {s[0]["value"].split()[-1]: s for s in _stages(dockerfile) if " AS " in s[0]["value"].upper()}
    stage, runs = _stages(dockerfile)[-1], []
    while stage is not None:
        runs += [i["value"] for i in stage if i["instruction"] == "RUN"]
        stage = stages.get(stage[0]["value"].split()[0])
    return " ".join(runs)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_has_a_c_compiler_for_the_kernels(dockerfile: Path) -> None:
    # The CPU delta kernel is compiled on first use (-march=native, on the node); Triton builds its
    # launchers with the system compiler. Without one, serving silently falls back to slow paths.
    runs = _runtime_lineage_runs(dockerfile)
    assert "apt-get install" in runs and " gcc" in runs and "libc6-dev" in runs
