"""Stop a study, a sweep or a run cleanly on SIGTERM, a preemption notice or Ctrl-C.

A preemptible VM sends SIGTERM and a user presses Ctrl-C; either way the work done so
far must survive and the *whole* job must stop (not just the current run, with the
next one started). Inside :func:`graceful`:

* SIGTERM and the first SIGINT print one line at once and set :func:`requested`;
* a training loop running in this process installs its own SIGTERM handler (it saves a
  checkpoint after the current step and raises ``loop.Preempted``); a Ctrl-C is handed
  to that handler, so Ctrl-C and SIGTERM save the same way;
* child processes registered with :func:`child` (the sweep's training subprocesses)
  get SIGTERM forwarded, save, and exit 143;
* when nothing of the above is running (an analysis stage, between runs) the handler
  raises :class:`Interrupted` at once: stage outputs are written atomically and a stage
  is marked done only at its end, so the rerun redoes only the interrupted unit;
* a second Ctrl-C aborts at once (``KeyboardInterrupt``).

The mains turn :class:`Interrupted` (and ``loop.Preempted``) into exit status 143 and a
line saying how to resume, also when a library re-raised it as its own error
(:func:`behind`).
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from typing import Callable, Iterator, Optional

EXIT_CODE = 143  # 128 + SIGTERM: what schedulers and `timeout` expect after a SIGTERM

_state = {"signum": None, "installed": False, "stop_now": None}
_children: set = set()
_lock = threading.Lock()


class Interrupted(BaseException):
    """The job was asked to stop (SIGTERM / SIGINT / preemption); finished work is saved.

    A ``BaseException`` like ``KeyboardInterrupt``: it may be raised inside library code
    (from the signal handler), and an ``except Exception`` there must not turn it into
    an ordinary error (seen: orbax restore reporting "damaged weights: Interrupted").
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def behind(error: BaseException) -> Optional[Interrupted]:
    """The :class:`Interrupted` that ``error`` stands for, or None.

    The handler raises into whatever code the signal interrupted; a library that catches
    errors there raises its own with ours as the cause (seen in CI: JAX comparing pytree
    metadata reported "ValueError: Exception raised while checking equality of metadata
    fields", and the study exited 1 with a traceback instead of 143).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def requested() -> Optional[int]:
    """The signal number that asked this process to stop, or None."""
    return _state["signum"]


def check(where: str = "") -> None:
    """Raises :class:`Interrupted` if a stop was requested (call between units of work)."""
    if _state["signum"] is not None:
        raise Interrupted(f"{signal.Signals(_state['signum']).name}"
                          + (f" ({where})" if where else ""))


def _handler(signum, frame):
    if _state["stop_now"] is not None:
        _state["stop_now"](signal.Signals(signum).name)
        return
    first = _state["signum"] is None
    if not first and signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt("second Ctrl-C: aborting without waiting")
    _state["signum"] = signum if first else _state["signum"]
    with _lock:
        kids = [p for p in _children if p.poll() is None]
    if first:
        print(f"received {signal.Signals(signum).name}: saving and stopping "
              f"({'waiting for ' + str(len(kids)) + ' run(s) to save; ' if kids else ''}"
              "press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
    for p in kids:
        p.send_signal(signal.SIGTERM)
    term = signal.getsignal(signal.SIGTERM)
    if term is not _handler and callable(term):  # a training loop's own handler is active
        if signum != signal.SIGTERM:
            term(signal.SIGTERM, frame)
        return
    if not kids and not _in_callback(frame):
        raise Interrupted(signal.Signals(signum).name)


def _in_callback(frame) -> bool:
    """Python drops (and prints) exceptions raised in finalizers and gc callbacks; there
    the request stays a flag that :func:`check` turns into :class:`Interrupted` later."""
    name = frame.f_code.co_name if frame is not None else ""
    return frame is None or name == "__del__" or "gc_callback" in name


@contextlib.contextmanager
def graceful(stop_now: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Installs the handlers above for the block (main thread only; else a no-op).

    ``stop_now``: for a job that keeps no state (a benchmark), called with the signal's
    name instead of raising :class:`Interrupted`; it must end the process: there is
    nothing to save, so nothing to wait for, and no exception is raised into whatever
    library call the signal interrupted.
    """
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _state.update(installed=True, signum=None, stop_now=stop_now)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state.update(installed=False, stop_now=None)


@contextlib.contextmanager
def child(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Registers a subprocess to receive SIGTERM when this job is asked to stop."""
    with _lock:
        _children.add(proc)
    if _state["signum"] is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the stop came while it was starting
    try:
        yield proc
    finally:
        with _lock:
            _children.discard(proc)
