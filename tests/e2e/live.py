"""Helpers of the e2e tests: live servers (`python -m server.cli serve` on free ports), fine-tunes
made in the test, and the merged-weights reference that decoupled serving must agree with."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

ADMIN_KEY = "admin-e2e-key"
READY_DEADLINE_S = 120.0


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    log: Path
    work_dir: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: Path, tmp: Path, **env: str) -> LiveServer:
    """A server process on a free port, ready (GET /ready is 200) when returned."""
    server = launch_server(base, tmp, **env)
    wait_ready(server)
    return server


def launch_server(base: Path, tmp: Path, **env: str) -> LiveServer:
    """A server process on a free port, still starting; `wait_ready` waits for it."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    variables = {
        "DELTASERVE_BASE_MODEL": str(base),
        "DELTASERVE_PORT": str(port),
        "DELTASERVE_HOST": "127.0.0.1",
        "DELTASERVE_REGISTRY_DIR": str(tmp / "registry"),
        "DELTASERVE_WORK_DIR": str(tmp / "work"),
        "DELTASERVE_KV_CACHE_BYTES": str(8 << 20),
        "DELTASERVE_ADMIN_KEYS": ADMIN_KEY,
        "DELTASERVE_LOG_LEVEL": "info",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve"],
        env=os.environ | variables,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return LiveServer(f"http://127.0.0.1:{port}", proc, log, tmp / "work")


def wait_ready(server: LiveServer) -> None:
    end = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"server not ready after {READY_DEADLINE_S}s:\n{server.log.read_text()[-3000:]}")


@contextmanager
def redis_replicas(base: Path, tmp: Path, redis_url: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two live servers of `base` sharing the registry at `redis_url`, ready; both stopped on exit."""
    env = {"DELTASERVE_REGISTRY": "redis", "DELTASERVE_REDIS_URL": redis_url}
    first, second = launch_server(base, tmp / "a", **env), launch_server(base, tmp / "b", **env)
    try:
        wait_ready(first)
        wait_ready(second)
        yield first, second
    finally:
        first.stop()
        second.stop()


def publish_synthetic_tasks(server: LiveServer, base: Path, root: Path, names: tuple[str, ...], seed0: int) -> None:
    """A synthetic fine-tune of `base` per name, ImPart-compressed (CR 8) and published as that task."""
    from compressor import compress
    from server.model.synthetic import write_synthetic_finetune

    with server.admin() as admin:
        for seed, task in enumerate(names, start=seed0):
            tuned = write_synthetic_finetune(base, root / f"ft-{task}", seed=seed, scale=0.6)
            artifact = root / f"{task}.safetensors"
            compress(base, tuned, artifact, method="impart", ratio=8.0, seed=seed)
            put = admin.put(f"/admin/v1/tasks/{task}/artifact", content=artifact.read_bytes())
            assert put.status_code in (200, 201), put.text


def shard(folder: Path, dest: Path) -> Path:
    """`folder` re-saved as two safetensors shards and an index."""
    dest.mkdir(parents=True)
    (dest / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[::2], names[1::2]), start=1):
        file = f"model-0000{index}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(dest / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def checkpoint_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """The multipart `files=` of an upload: every file of the folder."""
    return [("file", (path.name, path.read_bytes())) for path in sorted(folder.iterdir()) if path.is_file()]


def wait_job(admin: httpx.Client, job_id: str, deadline_s: float = 120.0) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        reply = admin.get(f"/admin/v1/jobs/{job_id}")
        assert reply.status_code == 200, f"job {job_id}: {reply.status_code} {reply.text}"
        job = reply.json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {deadline_s}s")


def greedy_reference(base: Path, artifact: bytes | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of a plain transformers Llama whose weights are W_base + the artifact's delta."""
    from transformers import AutoConfig, LlamaForCausalLM

    import compressor
    from server.model.config import ModelConfig

    state = load_file(str(base / "model.safetensors"))
    if artifact is not None:
        state = compressor.load_artifact(artifact, base).merged_state_dict(state)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(base)).float().eval()
    model.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    eos = set(ModelConfig.from_dir(base).eos_token_ids)
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(ids).logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
