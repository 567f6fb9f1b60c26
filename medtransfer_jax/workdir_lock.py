"""One writer per workdir: an advisory ``flock`` on ``WORKDIR/.lock`` plus who holds it.

Two trainings in one workdir delete each other's in-flight checkpoints and interleave
``metrics.jsonl``; two studies race on the same stage files. So ``train``, ``study``
and the sweep take :func:`hold` on their directory before writing anything there, and
a second process fails at once with the holder's pid and host.

Why ``fcntl.flock`` and not "the file exists": the kernel drops the lock when its
process dies (SIGKILL, OOM, a preempted VM that comes back), so a stale lock file from a
dead process is simply taken over (with a warning naming the dead pid); nobody has to
delete it by hand. The pid/host written inside only serve the error message. Remote
paths (``gs://``) cannot be locked this way and are not locked: a lock object in a
bucket needs a create-if-absent write (GCS generation-match precondition), which epath
does not offer, and a check-then-write marker would race and outlive a preempted
holder. So a ``gs://`` workdir only gets a warning, once per directory, that two writers
must be avoided. Multi-process runs
lock one file per process index (``.lock``, ``.lock.1``, ...), so the processes of one
job share the workdir while a second job is still refused.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator, Optional

from absl import logging

from medtransfer_jax.errors import WorkdirError

LOCK_FILE = ".lock"
_WARNED_REMOTE = set()   # gs:// workdirs already warned about in this process


def lock_path(workdir: str, process_index: int = 0) -> str:
    name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.{process_index}"
    return os.path.join(workdir, name)


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def acquire(workdir: str, process_index: int = 0, command: Optional[str] = None) -> Optional[int]:
    """Locks ``workdir`` (created if needed) for this process; returns the lock's fd.

    Raises:
      WorkdirError: another live process holds the lock.
    """
    if "://" in workdir:
        if process_index == 0 and workdir not in _WARNED_REMOTE:
            _WARNED_REMOTE.add(workdir)
            logging.warning(
                "workdir %s is in a bucket and is NOT locked (flock works on local disks "
                "only): make sure no other train/study/sweep writes there at the same time, "
                "or the two will delete each other's checkpoints and interleave metrics.",
                workdir)
        return None
    os.makedirs(workdir, exist_ok=True)
    path = lock_path(workdir, process_index)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd)
        os.close(fd)
        raise WorkdirError(
            f"workdir {workdir} is in use by process {who.get('pid', '?')} on host "
            f"{who.get('host', '?')} (lock file {path}, since {who.get('since', '?')}, "
            f"command: {who.get('command', '?')}); wait for it to finish or stop it, or "
            "use another --workdir") from None
    previous = _holder(fd)
    if previous.get("pid"):
        logging.warning("workdir %s: taking over the lock of process %s on %s, which is no "
                        "longer running", workdir, previous.get("pid"), previous.get("host"))
    me = dict(pid=os.getpid(), host=socket.gethostname(),
              since=time.strftime("%Y-%m-%d %H:%M:%S"),
              command=command or " ".join(sys.argv))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def release(fd: Optional[int]) -> None:
    """Unlocks; the file stays (emptied) so a later holder need not recreate it."""
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _first_missing(path: str) -> Optional[str]:
    """The topmost missing directory on the way to ``path`` (None if ``path`` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_if_unused(workdir: str, top: str, process_index: int) -> None:
    """Deletes ``workdir`` (and its new parents up to ``top``) when it holds nothing but
    its lock file and empty directories; anything else (a file someone else wrote)
    keeps it. Called while the lock is still held."""
    lock = os.path.abspath(lock_path(workdir, process_index))
    dirs = []
    for root, subdirs, files in os.walk(workdir, topdown=False):
        if any(os.path.abspath(os.path.join(root, f)) != lock for f in files):
            return
        dirs.append(root)
    try:
        os.remove(lock)
        for d in dirs:  # bottom-up: children first
            os.rmdir(d)
        parent = os.path.dirname(os.path.abspath(workdir))
        while len(parent) >= len(top) and parent.startswith(top):
            os.rmdir(parent)
            parent = os.path.dirname(parent)
    except OSError:  # something appeared meanwhile: leave the rest
        pass


@contextlib.contextmanager
def hold(workdir: str, process_index: int = 0,
         command: Optional[str] = None) -> Iterator[Optional[int]]:
    """``with hold(workdir):`` the block is the only writer of ``workdir``.

    If the block fails and ``hold`` created the (local) workdir, process 0 removes it
    again when it holds nothing but the lock and empty directories, so a run that failed
    at startup (a bad config, a missing dataset) leaves nothing behind.
    """
    local_main = process_index == 0 and "://" not in workdir
    top = _first_missing(workdir) if local_main else None
    fd = acquire(workdir, process_index, command)
    try:
        yield fd
    except BaseException:
        if top is not None:
            _remove_if_unused(workdir, top, process_index)
        raise
    finally:
        release(fd)
