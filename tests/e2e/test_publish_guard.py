"""Publish only what can be served, over HTTP on a live server: crafted artifacts (re-sealed with a valid
checksum) and crafted checkpoint folders are refused with a 4xx in OpenAI's shape, and nothing reaches
the registry: its task list and its blob store are unchanged, no job is queued, no upload is left."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from live import LiveServer, checkpoint_files, start_server

import compressor

GENERATED = 120
"""Bad uploads in the generated set (the goal: at least 100, none published)."""
METHODS = ("impart", "dare", "impart-qt")


def _crafted() -> ModuleType:
    """tests/compressor/crafted.py, the crafting helpers the compressor tests use (one copy)."""
    if "crafted" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "crafted", Path(__file__).parents[1] / "compressor" / "crafted.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["crafted"] = module
        spec.loader.exec_module(module)
    return sys.modules["crafted"]


crafted = _crafted()


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tiny_model, tmp_path_factory.mktemp("guard"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def good(tiny_model: Path, finetunes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Good artifacts of three layouts (svd, sparse, qsvd) of one fine-tune."""
    root = tmp_path_factory.mktemp("good")
    return {
        m: compressor.compress(
            tiny_model, finetunes["math"], root / f"{m}.safetensors", method=m, ratio=8.0
        ).out_path.read_bytes()
        for m in METHODS
    }


@pytest.fixture(scope="module")
def admin(server: LiveServer, good: dict[str, bytes]) -> Iterator[httpx.Client]:
    """An admin client, with one good task published so the registry is not empty."""
    with server.admin() as client:
        assert client.put("/admin/v1/tasks/kept/artifact", content=good["impart"]).status_code == 201
        yield client


def _state(server: LiveServer, admin: httpx.Client) -> tuple[object, ...]:
    """What publishing would change: the task list, the blob store's files, the jobs; and leftovers."""
    tasks = admin.get("/admin/v1/tasks").json()["data"]
    blobs = sorted(p.name for p in (server.work_dir.parent / "registry" / "blobs").rglob("*") if p.is_file())
    jobs = len(admin.get("/admin/v1/jobs").json()["data"])
    uploads = server.work_dir / "uploads"
    leftovers = sorted(p.name for p in uploads.iterdir()) if uploads.is_dir() else []
    return [(t["task"], t["current"], len(t["versions"])) for t in tasks], blobs, jobs, leftovers


def _assert_refused(reply: httpx.Response, code: str | None = None, says: str | None = None) -> None:
    assert 400 <= reply.status_code < 500, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert code is None or error["code"] == code, error
    assert says is None or says in error["message"], error


def _all_edits() -> dict[str, Callable]:
    return {**crafted.ARTIFACT_EDITS, **crafted.SPARSE_EDITS, **crafted.QSVD_EDITS}


def _method_for(kind: str) -> str:
    return "dare" if kind in crafted.SPARSE_EDITS else "impart-qt" if kind in crafted.QSVD_EDITS else "impart"


@pytest.mark.parametrize("kind", list(_all_edits()))
def test_a_crafted_artifact_is_400_invalid_artifact_and_publishes_nothing(
    kind: str, server: LiveServer, admin: httpx.Client, good: dict[str, bytes], tiny_model: Path
) -> None:
    before = _state(server, admin)
    bad = crafted.craft(good[_method_for(kind)], _all_edits()[kind], random.Random(7))
    reply = admin.put("/admin/v1/tasks/crafted/artifact", content=bad)
    _assert_refused(reply, code="invalid_artifact")
    message = reply.json()["error"]["message"]
    assert str(tiny_model) not in message and str(server.work_dir) not in message, message
    assert _state(server, admin) == before
    assert admin.get("/admin/v1/tasks/crafted").status_code == 404


def test_truncated_flipped_and_non_string_metadata_artifacts_are_refused(
    server: LiveServer, admin: httpx.Client, good: dict[str, bytes]
) -> None:
    before, rng, kinds = _state(server, admin), random.Random(3), set()
    while len(kinds) < 5:
        kind, bad = crafted.raw_damage(good["impart"], rng)
        kinds.add(kind)
        _assert_refused(admin.put("/admin/v1/tasks/damaged/artifact", content=bad), code="invalid_artifact")
    assert _state(server, admin) == before


def _edited_checkpoint(sharded: Path, tmp: Path, kind: str, outside: Path) -> list:
    folder = tmp / f"ckpt-{len(list(tmp.iterdir()))}"
    shutil.copytree(sharded, folder)
    crafted.checkpoint_edits(outside)[kind](folder)
    return checkpoint_files(folder)


HTTP_CHECKPOINT_KINDS = [k for k in crafted.checkpoint_edits(Path("/x")) if k != "symlink out"]
"""A multipart upload carries file contents, never links (a link out is refused in tests/compressor)."""


@pytest.mark.parametrize("kind", HTTP_CHECKPOINT_KINDS)
def test_a_crafted_shard_index_or_config_is_400_naming_the_entry(
    kind: str, server: LiveServer, admin: httpx.Client, finetunes: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    """The exploit first: an index naming the base's own weights by absolute path or `..`."""
    before = _state(server, admin)
    files = _edited_checkpoint(finetunes["code"], tmp_path, kind, tiny_model / "model.safetensors")
    reply = admin.post("/admin/v1/tasks/crafted/checkpoint", files=files)
    entry = "config.json" if kind.startswith("config") else "model.safetensors.index.json"
    _assert_refused(reply, says=entry)
    assert str(server.work_dir) not in reply.json()["error"]["message"]
    assert _state(server, admin) == before


def _generated_case(index: int, good: dict[str, bytes], sharded: Path, tmp: Path, outside: Path) -> tuple:
    """One bad upload: (kind, method, path, body) for httpx; the mix covers every crafted kind."""
    rng = random.Random(index)
    edits = _all_edits()
    roll = index % 6
    if roll < 4:
        kind = rng.choice(sorted(edits))
        return kind, "PUT", "artifact", {"content": crafted.craft(good[_method_for(kind)], edits[kind], rng)}
    if roll == 4:
        kind, bad = crafted.raw_damage(good[rng.choice(METHODS)], rng)
        return kind, "PUT", "artifact", {"content": bad}
    kind = rng.choice(HTTP_CHECKPOINT_KINDS)
    return kind, "POST", "checkpoint", {"files": _edited_checkpoint(sharded, tmp, kind, outside)}


def test_a_generated_set_of_bad_uploads_publishes_none(
    server: LiveServer,
    admin: httpx.Client,
    good: dict[str, bytes],
    finetunes: dict[str, Path],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    before = _state(server, admin)
    statuses, published = [], 0
    for index in range(GENERATED):
        _kind, method, route, body = _generated_case(
            index, good, finetunes["code"], tmp_path, tiny_model / "model.safetensors"
        )
        reply = admin.request(method, f"/admin/v1/tasks/gen-{index}/{route}", **body)
        statuses.append(reply.status_code)
        published += reply.status_code < 300
        _assert_refused(reply)
    assert len(statuses) >= 100 and published == 0
    assert _state(server, admin) == before
    assert [t["task"] for t in admin.get("/admin/v1/tasks").json()["data"]] == ["kept"]


def test_a_job_running_at_sigterm_is_recorded_interrupted_at_once(
    tiny_model: Path, finetunes: dict[str, Path], tmp_path: Path
) -> None:
    """SIGTERM while a job runs and a stream is being drained: the job's shared record says failed
    ("interrupted") within seconds, not `running` until it goes stale 60 s later; nothing is published
    and the upload and scratch are gone."""
    live = start_server(tiny_model, tmp_path / "sigterm", DELTASERVE_SHUTDOWN_TIMEOUT="20")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "ignore_eos": True}
    try:
        with live.admin() as client:
            job = client.post(
                "/admin/v1/tasks/cut/checkpoint",
                params={"ratio": 8, "method": "impart-qt"},
                files=checkpoint_files(finetunes["math"]),
            ).json()
            while client.get(f"/admin/v1/jobs/{job['id']}").json()["state"] == "queued":
                time.sleep(0.01)
            assert client.get(f"/admin/v1/jobs/{job['id']}").json()["state"] == "running"
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as reply:
            next(reply.iter_lines())
            live.proc.send_signal(signal.SIGTERM)
            record = _record_when_ended(tmp_path / "sigterm" / "registry" / "jobs" / f"{job['id']}.json")
        assert record.get("state") == "failed" and record["error"] == "interrupted: the server shut down", record
        assert live.proc.wait(timeout=60) is not None
    finally:
        live.stop()
    assert not (tmp_path / "sigterm" / "registry" / "index" / "cut.json").exists()
    for sub in ("uploads", "jobs"):
        folder = tmp_path / "sigterm" / "work" / sub
        assert not folder.is_dir() or list(folder.iterdir()) == []


def _record_when_ended(path: Path, within_s: float = 5.0) -> dict:
    """The job's shared record (a file of the local registry) once it says failed, or after within_s."""
    end, record = time.monotonic() + within_s, {}
    while time.monotonic() < end and record.get("state") != "failed":
        record = json.loads(path.read_text()) if path.is_file() else {}
        time.sleep(0.05)
    return record
