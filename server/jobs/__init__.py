"""Upload -> compress -> publish, off the request path."""

from server.jobs.jobs import Job, JobManager, JobsClosedError, JobSpec

__all__ = ["Job", "JobManager", "JobSpec", "JobsClosedError"]
