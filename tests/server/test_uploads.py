"""Streaming multipart uploads: file-name policy, byte cap, files land on disk whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.api.errors import APIError
from server.api.uploads import checkpoint_filename, receive_checkpoint, receive_raw


@pytest.mark.parametrize(
    "name, kept",
    [
        ("config.json", "config.json"),
        ("model.safetensors", "model.safetensors"),
        ("model-00001-of-00002.safetensors", "model-00001-of-00002.safetensors"),
        ("model.safetensors.index.json", "model.safetensors.index.json"),
        ("sub/dir/config.json", "config.json"),
        ("tokenizer.json", None),
        ("generation_config.json", None),
        ("README.md", None),
    ],
)
def test_checkpoint_files_are_kept_or_skipped(name: str, kept: str | None) -> None:
    assert checkpoint_filename(name) == kept


@pytest.mark.parametrize("name", ["pytorch_model.bin", "training_args.bin", "model.pt", "weights.pkl", "x.ckpt"])
def test_pickle_based_files_are_refused_by_name(name: str) -> None:
    with pytest.raises(APIError) as refused:
        checkpoint_filename(name)
    assert refused.value.status == 400 and "pickle" in refused.value.message


def test_unknown_binary_files_are_refused() -> None:
    with pytest.raises(APIError):
        checkpoint_filename("model.gguf")


def _multipart(files: list[tuple[str, bytes]]) -> tuple[str, list[bytes]]:
    request = httpx.Request("POST", "http://x/", files=[("file", (n, d)) for n, d in files])
    body = request.read()
    return request.headers["content-type"], [body[i : i + 7] for i in range(0, len(body), 7)]


async def _aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_files_stream_to_disk_whole(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 40
    content_type, chunks = _multipart(
        [("config.json", b"{}"), ("model.safetensors", weights), ("tokenizer.json", b"{}")]
    )
    upload = await receive_checkpoint(content_type, _aiter(chunks), tmp_path, limit=1 << 20)
    assert upload.files == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert not (tmp_path / "tokenizer.json").exists()


async def test_upload_over_the_cap_is_413(tmp_path: Path) -> None:
    content_type, chunks = _multipart([("config.json", b"{}"), ("model.safetensors", b"\0" * 5000)])
    with pytest.raises(APIError) as refused:
        await receive_checkpoint(content_type, _aiter(chunks), tmp_path, limit=4000)
    assert refused.value.status == 413


async def test_checkpoint_without_config_or_weights_is_refused(tmp_path: Path) -> None:
    for files in ([("model.safetensors", b"w")], [("config.json", b"{}")]):
        content_type, chunks = _multipart(files)
        folder = tmp_path / files[0][0]
        folder.mkdir()
        with pytest.raises(APIError) as refused:
            await receive_checkpoint(content_type, _aiter(chunks), folder, limit=1 << 20)
        assert refused.value.status == 400


async def test_non_multipart_body_is_refused(tmp_path: Path) -> None:
    with pytest.raises(APIError) as refused:
        await receive_checkpoint("application/json", _aiter([b"{}"]), tmp_path, limit=100)
    assert refused.value.param == "file"


async def test_raw_body_over_the_cap_is_413(tmp_path: Path) -> None:
    assert await receive_raw(_aiter([b"a" * 10, b"b" * 10]), tmp_path / "ok", limit=20) == 20
    with pytest.raises(APIError) as refused:
        await receive_raw(_aiter([b"a" * 10, b"b" * 11]), tmp_path / "big", limit=20)
    assert refused.value.status == 413


def test_a_shard_linked_out_of_the_upload_is_400_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    """A multipart body carries no links, but the upload folder is checked as if it could: a shard that
    is a link to a file outside (here the base's own weights) is refused, naming the index entry."""
    import json

    from server.api.admin_routes import _check_checkpoint

    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    (folder / "model-00001-of-00001.safetensors").symlink_to(tiny_model / "model.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(APIError) as refused:
        _check_checkpoint(tiny_model, folder)
    assert refused.value.status == 400 and refused.value.param == "file"
    message = refused.value.message
    assert "model.safetensors.index.json: shard 'model-00001-of-00001.safetensors'" in message
    assert "symbolic link" in message and str(tiny_model) not in message and str(folder) not in message


def test_an_upload_after_shutdown_began_is_503_and_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """Jobs stop when the drain begins; an upload still arriving on an open connection gets a 503 (retry
    elsewhere), not a 500, and its files are removed."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import load_settings

    settings = load_settings(
        base_model=str(tiny_model), registry_dir=tmp_path / "reg", work_dir=tmp_path / "work", kv_cache_bytes=4 << 20
    )
    files = [
        ("file", (p.name, p.read_bytes()))
        for p in sorted(tiny_model.iterdir())
        if p.name in ("config.json", "model.safetensors")
    ]
    with TestClient(create_app(settings)) as client:
        client.app.state.deltaserve.jobs.shutdown()
        reply = client.post("/admin/v1/tasks/late/checkpoint", files=files)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "not_ready"
        assert list((tmp_path / "work" / "uploads").iterdir()) == []
