"""Compression jobs with the real compressor on the tiny base: publish on success only, clean up always."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.jobs import JobManager, JobSpec
from server.jobs.jobs import collect_leftovers
from server.model.provision import write_synthetic_finetune
from server.registry import Registry
from server.registry.local import LocalStore


@pytest.fixture(scope="module")
def finetune(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_finetune(tiny_model, tmp_path_factory.mktemp("ft") / "ft", seed=3, scale=0.3)


@pytest.fixture(scope="module")
def jobs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobManager]:
    """One manager (and one worker process) for the tests that let their jobs finish."""
    root = tmp_path_factory.mktemp("jobs")
    manager = JobManager(Registry(LocalStore(root / "reg")), tiny_model, root / "work")
    yield manager
    manager.shutdown(wait=True)


def _upload(finetune: Path, work: Path, name: str) -> Path:
    folder = work / "uploads" / f"{os.getpid()}-{name}"
    folder.mkdir(parents=True)
    for file in ("config.json", "model.safetensors"):
        shutil.copy(finetune / file, folder / file)
    return folder


def _wait(jobs: JobManager, job_id: str) -> None:
    end = time.monotonic() + 120
    while jobs.get(job_id).state in ("queued", "running") and time.monotonic() < end:
        time.sleep(0.05)


def test_a_job_compresses_verifies_and_publishes(jobs: JobManager, finetune: Path) -> None:
    registry, work = jobs.registry, jobs.work_dir
    upload = _upload(finetune, work, "a")
    job = jobs.submit(JobSpec("t", upload, method="impart", ratio=8.0))
    _wait(jobs, job.id)
    done = jobs.get(job.id)
    assert done.state == "succeeded" and done.version == 1 and done.done == done.total > 0
    version = registry.require("t").current_version
    assert version.source == "checkpoint" and version.ratio == 8.0 and version.quality
    assert not upload.exists() and list((work / "jobs").iterdir()) == []


def test_a_failing_job_says_why_and_publishes_nothing(jobs: JobManager, finetune: Path) -> None:
    registry = jobs.registry
    upload = _upload(finetune, jobs.work_dir, "b")
    (upload / "model.safetensors").write_bytes((upload / "model.safetensors").read_bytes()[:1000])
    job = jobs.submit(JobSpec("broken", upload, method="impart", ratio=8.0))
    _wait(jobs, job.id)
    failed = jobs.get(job.id)
    assert failed.state == "failed" and failed.error.startswith("IncompatibleCheckpointError")
    assert registry.lookup("broken") is None and not upload.exists()
    assert jobs.counts()["failed"] == 1


def test_shutdown_cancels_queued_jobs_and_removes_their_uploads(tiny_model: Path, finetune: Path,
                                                                tmp_path: Path) -> None:
    registry = Registry(LocalStore(tmp_path / "reg"))
    jobs = JobManager(registry, tiny_model, tmp_path / "work")
    first = jobs.submit(JobSpec("one", _upload(finetune, tmp_path / "work", "1"), method="impart", ratio=8.0))
    second_upload = _upload(finetune, tmp_path / "work", "2")
    second = jobs.submit(JobSpec("two", second_upload, method="impart", ratio=8.0))
    jobs.shutdown(wait=True)
    assert jobs.get(second.id).state == "failed" and "cancelled" in jobs.get(second.id).error
    assert not second_upload.exists() and registry.lookup("two") is None
    assert jobs.get(first.id).state in ("succeeded", "failed")


def test_leftovers_of_dead_processes_are_collected(tmp_path: Path) -> None:
    dead = tmp_path / "uploads" / "999999999-abc"
    dead.mkdir(parents=True)
    live = tmp_path / "uploads" / f"{os.getpid()}-def"
    live.mkdir()
    assert collect_leftovers(tmp_path) == ["uploads/999999999-abc"]
    assert live.exists() and not dead.exists()
