"""One writer per workdir (issue #10.5): a second process fails at once naming the holder;
a lock left by a killed process is taken over."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from _train_utils import REPO, subprocess_env

from medtransfer_jax import workdir_lock
from medtransfer_jax.errors import WorkdirError

HOLDER = """
import sys, time
from medtransfer_jax import workdir_lock
fd = workdir_lock.acquire(sys.argv[1], command="holder")
print("locked", flush=True)
time.sleep(600)
"""


def _holder(wd):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(wd)], env=subprocess_env(),
                         cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_process_is_refused_with_pid_and_host(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirError) as e:
            workdir_lock.acquire(str(tmp_path))
        msg = str(e.value)
        assert f"process {p.pid} on host {socket.gethostname()}" in msg
        assert workdir_lock.lock_path(str(tmp_path)) in msg
        # The train main refuses too, before building anything, with exit 2.
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "medtransfer_jax.train",
                            f"--workdir={tmp_path}"], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"train: error: workdir {tmp_path} is in use by process {p.pid}" in r.stderr
        assert "Traceback" not in r.stderr and time.time() - t0 < 60
        assert sorted(os.listdir(tmp_path)) == [".lock"]  # the train main wrote nothing
    finally:
        p.kill()
        p.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    p = _holder(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with open(workdir_lock.lock_path(str(tmp_path))) as f:
        assert str(p.pid) in f.read()  # the dead holder's record is still there
    with workdir_lock.hold(str(tmp_path)):
        with open(workdir_lock.lock_path(str(tmp_path))) as f:
            assert f'"pid": {os.getpid()}' in f.read()
        with pytest.raises(WorkdirError):  # held: even this process cannot take it twice
            workdir_lock.acquire(str(tmp_path))
    fd = workdir_lock.acquire(str(tmp_path))  # released at the end of the block
    workdir_lock.release(fd)


def test_processes_of_one_job_lock_separately(tmp_path):
    fd0 = workdir_lock.acquire(str(tmp_path), 0)
    fd1 = workdir_lock.acquire(str(tmp_path), 1)
    try:
        with pytest.raises(WorkdirError):
            workdir_lock.acquire(str(tmp_path), 1)
    finally:
        workdir_lock.release(fd0)
        workdir_lock.release(fd1)
    assert workdir_lock.acquire("gs://bucket/run") is None  # remote: not lockable, not locked


def test_bucket_workdir_is_not_locked_and_says_so_once(monkeypatch):
    warnings = []
    monkeypatch.setattr(workdir_lock.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    for index in (0, 0, 1):
        assert workdir_lock.acquire("gs://bucket/unlocked-run", index) is None
    assert len(warnings) == 1
    assert "gs://bucket/unlocked-run is in a bucket and is NOT locked" in warnings[0]
    with workdir_lock.hold("gs://bucket/other-run") as fd:
        assert fd is None and len(warnings) == 2


class _Boom(Exception):
    pass


def _fail_inside(wd, index=0, write=None):
    with pytest.raises(_Boom):
        with workdir_lock.hold(str(wd), index):
            os.makedirs(os.path.join(wd, "checkpoints", "tmp"))  # empty dirs, as orbax makes
            if write:
                with open(os.path.join(wd, write), "w") as f:
                    f.write("x")
            raise _Boom


def test_failed_body_removes_the_workdir_hold_created(tmp_path):
    """A run that fails at startup leaves nothing behind: the workdir (and the parents
    hold made for it) goes when it holds only the lock and empty directories."""
    wd = tmp_path / "new" / "run"
    _fail_inside(wd)
    assert os.listdir(tmp_path) == []
    # Success keeps it; a failure after some file was written keeps it too.
    with workdir_lock.hold(str(wd)):
        pass
    assert sorted(os.listdir(wd)) == [".lock"]
    other = tmp_path / "other"
    _fail_inside(other, write="config.json")
    assert sorted(os.listdir(other)) == [".lock", "checkpoints", "config.json"]


def test_failed_body_keeps_a_workdir_that_existed(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    _fail_inside(wd)
    assert sorted(os.listdir(wd)) == [".lock", "checkpoints"]  # not ours to delete
    fresh = tmp_path / "fresh"
    _fail_inside(fresh, index=1)  # only process 0 cleans up (other hosts share the dir)
    assert sorted(os.listdir(fresh)) == [".lock.1", "checkpoints"]
    workdir_lock.release(workdir_lock.acquire(str(wd)))  # the lock was released
