"""A job whose driver died (SIGKILL) is stopped by the next run-local or scripts/stack; a live one is not."""

import os
import signal
import subprocess
import time

import psutil
import pytest

from devstack import process
from devstack.config import load_config
from devstack.cpu_usage import session_of


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("STACK_DIR", str(tmp_path / "stack"))
    return load_config()


def start_job(cfg, name: str) -> subprocess.Popen:
    # A launcher with a child of its own, like the pipeline's Python process with Prism and Java under it.
    job = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)
    process.record_job(cfg, name, job.pid)
    return job


def session_members(session: int) -> list[int]:
    return [
        process.pid
        for process in psutil.process_iter(["status"])
        if session_of(process) == session and process.info["status"] != psutil.STATUS_ZOMBIE
    ]


def wait_for_members(session: int, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(session_members(session)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_job_whose_driver_died_is_stopped_with_its_children(cfg):
    job = start_job(cfg, "pipeline.log")
    wait_for_members(job.pid, 2)
    record = cfg.run_dir / "job-pipeline.log.session"
    # The driver that recorded it is gone: a pid with another start time is not it.
    session, driver, _ = record.read_text().split()
    record.write_text(f"{session} {driver} 0\n")

    stopped = process.stop_orphaned_jobs(cfg, timeout=5)

    job.wait(timeout=5)
    assert len(stopped) == 2  # bash and its sleep
    assert session_members(job.pid) == []
    assert not record.exists()


def test_a_job_whose_driver_lives_is_left_alone(cfg):
    job = start_job(cfg, "pipeline.log")
    try:
        wait_for_members(job.pid, 2)
        assert process.stop_orphaned_jobs(cfg, timeout=5) == []
        assert job.poll() is None
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        process.forget_job(cfg, "pipeline.log")
