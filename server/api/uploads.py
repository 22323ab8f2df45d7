"""Uploads streamed to disk: multipart checkpoints (safetensors + config.json), PEFT adapters
(adapter_config.json + adapter_model.safetensors) and raw artifacts.

The body is parsed as it arrives (python-multipart's streaming parser) and each file is written
straight to the destination folder, so no upload is ever held in memory; the byte cap is enforced
on the bytes received, whatever Content-Length claims. Pickle-based weights are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.api.errors import APIError, bad_request, too_large

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # a stub-only TypedDict

CHECKPOINT_FILES = re.compile(r"(config\.json|[A-Za-z0-9._-]+\.safetensors|model\.safetensors\.index\.json)")
SKIPPED_SUFFIXES = (".json", ".txt", ".md", ".jinja", ".model", ".gitattributes")
"""Side files of an HF folder (tokenizer, generation config, model card): accepted and dropped."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class UploadedCheckpoint:
    """The files an upload wrote into its folder, and their total size."""

    folder: Path
    files: list[str] = field(default_factory=list)
    size: int = 0


def _refuse_pickle(name: str) -> str:
    """The file's base name; 400 when it is a pickle-based weights file."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base.lower().endswith(PICKLE_SUFFIXES):
        raise bad_request(
            f"`{base}` is a pickle-based checkpoint file; only safetensors are accepted "
            f"(convert with `save_pretrained(..., safe_serialization=True)`).",
            "file",
        )
    return base


def adapter_filename(name: str) -> str | None:
    """The file's name when a PEFT adapter folder holds it; None to skip side files; 400 for anything else."""
    base = _refuse_pickle(name)
    if base in ADAPTER_FILES:
        return base
    if base.lower().endswith(SKIPPED_SUFFIXES):
        return None
    raise bad_request(f"`{base}` is not part of a LoRA adapter: send {' and '.join(ADAPTER_FILES)}.", "file")


def checkpoint_filename(name: str) -> str | None:
    """The file's name when a checkpoint may hold it; None to skip it; 400 for anything else."""
    base = _refuse_pickle(name)
    if CHECKPOINT_FILES.fullmatch(base):
        return base
    if base.lower().endswith(SKIPPED_SUFFIXES):
        return None
    raise bad_request(
        f"`{base}` is not part of a checkpoint: send config.json and *.safetensors "
        f"(and model.safetensors.index.json when sharded).",
        "file",
    )


async def receive_checkpoint(
    content_type: str | None, body: AsyncIterator[bytes], folder: Path, limit: int
) -> UploadedCheckpoint:
    """Stream a multipart body's files into `folder`; checks names, the cap, and config.json's presence."""
    upload = await _receive_files(content_type, body, folder, limit, checkpoint_filename)
    if "config.json" not in upload.files:
        raise bad_request("The checkpoint has no config.json.", "file")
    if not any(n.endswith(".safetensors") for n in upload.files):
        raise bad_request("The checkpoint has no *.safetensors file.", "file")
    return upload


async def receive_adapter(
    content_type: str | None, body: AsyncIterator[bytes], folder: Path, limit: int
) -> UploadedCheckpoint:
    """Stream a multipart PEFT adapter into `folder`: adapter_config.json and adapter_model.safetensors."""
    upload = await _receive_files(content_type, body, folder, limit, adapter_filename)
    for name in ADAPTER_FILES:
        if name not in upload.files:
            raise bad_request(f"The adapter has no {name}.", name)
    return upload


async def _receive_files(
    content_type: str | None, body: AsyncIterator[bytes], folder: Path, limit: int, namer: Callable[[str], str | None]
) -> UploadedCheckpoint:
    """Stream a multipart body's files into `folder`, each named by `namer` (None: skipped); the cap."""
    boundary = _boundary(content_type)
    sink = _PartSink(folder, limit, namer)
    parser = MultipartParser(boundary, sink.callbacks())
    try:
        async for data in body:
            parser.write(data)
            if sink.error is not None:
                raise sink.error
        parser.finalize()
    except MultipartParseError as exc:
        raise bad_request(f"The multipart body is malformed: {exc}", "file") from None
    finally:
        sink.close()
    if sink.error is not None:
        raise sink.error
    return sink.upload


async def receive_raw(body: AsyncIterator[bytes], target: Path, limit: int) -> int:
    """Stream a raw request body into `target`; 413 past `limit` bytes. Returns the size."""
    size = 0
    with target.open("wb") as out:
        async for data in body:
            size += len(data)
            if size > limit:
                raise too_large(limit)
            out.write(data)
    return size


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise bad_request("Send the files as multipart/form-data (one part per file).", "file")
    return options[b"boundary"]


class _PartSink:
    """Callbacks of the multipart parser: one part at a time, written to its file as it arrives."""

    def __init__(self, folder: Path, limit: int, namer: Callable[[str], str | None]) -> None:
        self.upload = UploadedCheckpoint(folder)
        self.limit = limit
        self.namer = namer
        self.error: APIError | None = None
        self._header_field, self._header_value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._out: BinaryIO | None = None

    def callbacks(self) -> MultipartCallbacks:
        """The parser's callbacks, bound to this sink."""
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._field,
            "on_header_value": self._value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._open,
            "on_part_data": self._data,
            "on_part_end": self.close,
        }

    def _begin(self) -> None:
        self._headers = {}

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _open(self) -> None:
        if self.error is not None:
            return
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        if filename is None:
            return
        try:
            name = self.namer(filename.decode("utf-8", "replace"))
        except APIError as exc:
            self.error = exc
            return
        if name is not None and name in self.upload.files:
            self.error = bad_request(f"`{name}` was sent twice.", "file")
        elif name is not None:
            self.upload.files.append(name)
            self._out = (self.upload.folder / name).open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.upload.size += end - start
        if self.upload.size > self.limit and self.error is None:
            self.error = too_large(self.limit)
        if self._out is not None and self.error is None:
            self._out.write(data[start:end])

    def close(self) -> None:
        """Close the file of the part being written, if any."""
        if self._out is not None:
            self._out.close()
            self._out = None
