"""Compression jobs with the real compressor on the tiny base: publish on success only, clean up always."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.jobs import JobManager, JobSpec
from server.jobs.jobs import Job, collect_leftovers
from server.model.synthetic import write_synthetic_finetune
from server.registry import Registry, RegistryUnavailableError
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


def test_shutdown_cancels_queued_jobs_and_removes_their_uploads(
    tiny_model: Path, finetune: Path, tmp_path: Path
) -> None:
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


@pytest.fixture(params=["local", "redis"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """One registry store two replicas share: a folder, or a real Redis."""
    if request.param == "local":
        yield LocalStore(tmp_path / "reg")
        return
    from server.registry.redis_store import RedisStore

    store = RedisStore(request.getfixturevalue("redis_url"))
    yield store
    store.close()


def test_any_replica_answers_for_a_job_another_one_runs(
    shared_store: object, tiny_model: Path, finetune: Path, tmp_path: Path
) -> None:
    """Behind the gateway an upload and the polls of its job reach different replicas."""
    runner = JobManager(Registry(shared_store), tiny_model, tmp_path / "work-a", replica="a")
    other = JobManager(Registry(shared_store), tiny_model, tmp_path / "work-b", replica="b")
    try:
        job = runner.submit(JobSpec("shared", _upload(finetune, tmp_path / "work-a", "s"), method="impart", ratio=8.0))
        seen = other.get(job.id)
        assert seen is not None and seen.task == "shared" and seen.replica == "a"
        _wait(other, job.id)
        done = other.get(job.id)
        assert done.state == "succeeded" and done.version == 1 and done.done == done.total > 0
        assert job.id in [j.id for j in other.list()] and not other.active("shared")
        assert other.get("job-unknown") is None and other.get("../../etc/passwd") is None
    finally:
        runner.shutdown(wait=True)
        other.shutdown(wait=True)


def test_a_job_whose_replica_stopped_reporting_is_shown_lost(
    shared_store: object, tiny_model: Path, tmp_path: Path
) -> None:
    from server.jobs.jobs import STALE_S

    viewer = JobManager(Registry(shared_store), tiny_model, tmp_path / "work")
    try:
        fresh = Job(id="job-fresh", task="t", method="impart", ratio=8.0, state="running", replica="gone:1")
        stale = Job(
            id="job-stale",
            task="u",
            method="impart",
            ratio=8.0,
            state="running",
            replica="gone:1",
            updated=time.time() - 2 * STALE_S,
        )
        for job in (fresh, stale):
            shared_store.put_job(job.to_dict())
        assert viewer.get("job-fresh").state == "running" and viewer.active("t")
        lost = viewer.get("job-stale")
        assert lost.state == "failed" and lost.error.startswith("lost: replica gone:1") and not viewer.active("u")
    finally:
        viewer.shutdown(wait=True)


def test_local_job_records_expire(tmp_path: Path) -> None:
    from server.registry.store import JOB_TTL_S

    store = LocalStore(tmp_path / "reg")
    store.put_job({"id": "job-old", "state": "succeeded"})
    store.put_job({"id": "job-new", "state": "succeeded"})
    old = time.time() - JOB_TTL_S - 60
    os.utime(tmp_path / "reg" / "jobs" / "job-old.json", (old, old))
    assert [r["id"] for r in store.jobs()] == ["job-new"] and store.job("job-old") is None
    assert not (tmp_path / "reg" / "jobs" / "job-old.json").exists()
    with pytest.raises(ValueError):
        store.put_job({"id": "../escape"})


def test_counts_are_this_replicas_jobs_only(tmp_path: Path, tiny_model: Path) -> None:
    """deltaserve_jobs{state} is summed over replicas: another replica's job must not count here."""
    store = LocalStore(tmp_path / "reg")
    viewer = JobManager(Registry(store), tiny_model, tmp_path / "work")
    try:
        store.put_job(Job(id="job-elsewhere", task="t", method="impart", ratio=8.0, state="running").to_dict())
        assert viewer.get("job-elsewhere") is not None
        assert viewer.counts() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0}
    finally:
        viewer.shutdown(wait=True)


def test_a_job_whose_artifact_fails_the_full_check_publishes_nothing(jobs: JobManager, finetune: Path) -> None:
    """A fine-tune with a NaN weight fits the base (same names, shapes, dtypes) and compresses, but its
    artifact does not decode to finite values: the job fails naming the module and publishes nothing."""
    from safetensors.torch import load_file, save_file

    upload = _upload(finetune, jobs.work_dir, "nan")
    tensors = load_file(str(upload / "model.safetensors"))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(upload / "model.safetensors"))
    blobs_before = jobs.registry.store.blob_digests()
    job = jobs.submit(JobSpec("diverged", upload, method="impart", ratio=8.0))
    _wait(jobs, job.id)
    failed = jobs.get(job.id)
    assert failed.state == "failed" and failed.error.startswith("InvalidArtifactError: model.norm.weight")
    assert "non-finite" in failed.error and jobs.registry.lookup("diverged") is None and not upload.exists()
    assert jobs.registry.store.blob_digests() == blobs_before


def test_a_job_running_at_shutdown_is_recorded_interrupted_at_once(
    tiny_model: Path, finetune: Path, tmp_path: Path
) -> None:
    """Not `running` until the record goes stale (60 s): failed the moment the server shuts down, in the
    shared record too, with its upload and scratch gone; and it never publishes afterwards."""
    from server.jobs.jobs import INTERRUPTED

    store = LocalStore(tmp_path / "reg")
    jobs = JobManager(Registry(store), tiny_model, tmp_path / "work")
    upload = _upload(finetune, tmp_path / "work", "running")
    job = jobs.submit(JobSpec("cut", upload, method="impart", ratio=8.0))
    end = time.monotonic() + 30
    while jobs.get(job.id).state == "queued" and time.monotonic() < end:
        time.sleep(0.01)
    assert jobs.get(job.id).state == "running"
    jobs.shutdown(wait=False)
    for seen in (jobs.get(job.id), Job.from_record(store.job(job.id), time.time())):
        assert seen.state == "failed" and seen.error == INTERRUPTED and seen.finished is not None
    scratch = tmp_path / "work" / "jobs"
    assert not upload.exists() and (not scratch.exists() or list(scratch.iterdir()) == [])
    time.sleep(2.0)
    assert jobs.get(job.id).error == INTERRUPTED and jobs.registry.lookup("cut") is None
    jobs.shutdown(wait=True)  # the app calls it again when it stops: a no-op
    assert Job.from_record(store.job(job.id), time.time()).error == INTERRUPTED


def test_a_job_submitted_after_shutdown_is_refused(tiny_model: Path, finetune: Path, tmp_path: Path) -> None:
    from server.jobs import JobsClosedError

    jobs = JobManager(Registry(LocalStore(tmp_path / "reg")), tiny_model, tmp_path / "work")
    jobs.shutdown(wait=True)
    with pytest.raises(JobsClosedError):
        jobs.submit(JobSpec("late", _upload(finetune, tmp_path / "work", "late"), method="impart", ratio=8.0))
    assert jobs.list() == []


def test_a_job_and_its_shared_record_have_the_same_fields() -> None:
    """JobRecord (what the store keeps) and Job (what jobs write and read) list one set of fields."""
    import dataclasses

    from server.registry import JobRecord

    assert list(JobRecord.__annotations__) == [f.name for f in dataclasses.fields(Job)]
    job = Job(id="job-x", task="t", method="impart", ratio=8.0)
    assert Job.from_record(job.to_dict(), time.time()) == job


def test_a_shared_record_keeps_only_known_fields() -> None:
    """A newer replica may write more fields; a record that is not a JSON object is refused."""
    import json

    from server.registry.records import job_record_from_json

    job = Job(id="job-x", task="t", method="impart", ratio=8.0)
    record = job_record_from_json(json.dumps({**job.to_dict(), "newer": 1}))
    assert "newer" not in record and Job.from_record(record, time.time()) == job
    with pytest.raises(ValueError):
        job_record_from_json("[1, 2]")


def test_the_registry_facade_keeps_job_records(tmp_path: Path) -> None:
    registry = Registry(LocalStore(tmp_path / "reg"))
    record = Job(id="job-r", task="t", method="impart", ratio=8.0).to_dict()
    registry.put_job(record)
    assert registry.job("job-r") == record and registry.jobs() == [record]
    assert registry.job("../escape") is None and registry.job("job-none") is None
    with pytest.raises(ValueError):
        registry.put_job({**record, "id": "../escape"})


class _DownJobRecords(LocalStore):
    """A LocalStore whose job records cannot be reached (the index still can)."""

    def put_job(self, record: object) -> None:
        raise RegistryUnavailableError("down")

    def job(self, job_id: str) -> None:
        raise RegistryUnavailableError("down")

    def jobs(self) -> list[object]:
        raise RegistryUnavailableError("down")


def test_an_unreachable_registry_breaks_neither_jobs_nor_their_pages(
    tiny_model: Path, finetune: Path, tmp_path: Path
) -> None:
    jobs = JobManager(Registry(_DownJobRecords(tmp_path / "reg")), tiny_model, tmp_path / "work")
    try:
        job = jobs.submit(JobSpec("t", _upload(finetune, tmp_path / "work", "down"), method="impart", ratio=8.0))
        assert jobs.get(job.id) is not None and [j.id for j in jobs.list()] == [job.id]
        assert jobs.get("job-elsewhere") is None
    finally:
        jobs.shutdown(wait=True)
