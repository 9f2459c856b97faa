"""Retention: the one implementation of removing old jobs with their spooled image and result folder.

Used by the service's hourly retention (``[storage] retention_days``) and by ``pacs-ai jobs purge``.
``JobStore.purge`` decides which jobs go (finished before the cut-off, no delivery still open) and deletes
their rows; this module then removes each job's spool file and ``<results>/<job id>`` folder, but only
where they lie under the configured spool and results folders (a row naming a path elsewhere is never
followed out of them).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pacs_ai.queue.jobstore import JobStore

__all__ = ["PurgeReport", "purge_old_jobs"]


@dataclass(frozen=True)
class PurgeReport:
    """What one purge removed: the job IDs, how many spool files and result folders, and the files it
    could not remove (``"job N: error"``)."""

    job_ids: tuple[int, ...]
    spool_files_removed: int
    result_folders_removed: int
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "jobs": len(self.job_ids),
            "job_ids": list(self.job_ids),
            "spool_files_removed": self.spool_files_removed,
            "result_folders_removed": self.result_folders_removed,
            "errors": list(self.errors),
        }


def _remove(path: Path, root: Path) -> bool:
    """Delete ``path`` (file or folder) if it lies under ``root``; True if something was removed."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    try:
        if path.is_dir():
            shutil.rmtree(path)
            return True
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def purge_old_jobs(jobs: JobStore, older_than: timedelta, *, spool_dir: Path, results_dir: Path) -> PurgeReport:
    """Delete the jobs finished more than ``older_than`` ago (``JobStore.purge``) and their files.

    A file that cannot be removed (permissions, ...) is reported in ``errors``, never raised: the rows are
    gone by then. Raises JobStoreError when the database cannot be written.
    """
    purged = jobs.purge(older_than)
    files = folders = 0
    problems: list[str] = []
    for job in purged:
        try:
            files += _remove(Path(job.spool_path), spool_dir)
            folders += _remove(results_dir / str(job.id), results_dir)
        except OSError as exc:
            problems.append(f"job {job.id}: {exc}")
    return PurgeReport(tuple(j.id for j in purged), files, folders, tuple(problems))
