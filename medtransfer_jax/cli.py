"""The one harness of every main (``python -m medtransfer_jax.{convert,train,evaluate,
analyze,study,sweep,bench}``): flag parsing, logging, multi-host flags, errors, signals.

Why one harness: a user who mistypes a flag, points at a missing file or a read-only
directory should get the same answer from every command, ``CMD: error: <what and how to
fix it>`` on one line and exit status 2, with nothing created on disk; a stopped job
(SIGTERM, preemption, Ctrl-C) should always exit 143 with a line saying how to resume.
So the mains call :func:`run` instead of ``absl.app.run`` and validate their inputs with
the ``check_*`` helpers *before* importing JAX or touching the disk.

Flag vocabulary shared by the mains: ``--config`` (+ ``--config.a.b=v`` overrides),
``--workdir`` (a run or study directory that is reused to resume), ``--output_dir``
(a directory of outputs), ``--output`` (a single output file), ``--dataset`` /
``--data_root`` / ``--fold`` / ``--split(s)``, ``--batch_size``, ``--multihost``
(+ ``--coordinator_address``, ``--num_processes``, ``--process_id``), ``--verbosity``
(``--verbosity=1`` keeps tracebacks of user errors).

User errors are :class:`medtransfer_jax.errors.UserError` (any layer raises a subclass),
``absl.app.UsageError`` and flag-parsing errors.
"""
from __future__ import annotations

import difflib
import logging as pylogging
import multiprocessing
import os
import re
import shlex
import sys
import tempfile
from typing import Callable, List, Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from medtransfer_jax import configs, interrupts
from medtransfer_jax.errors import UserError

FLAGS = flags.FLAGS

_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (Cloud "
                               "TPU pod slices and multi-node GPU clusters auto-detect the rest).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (manual "
                             "multi-process runs, e.g. several local processes).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (manual multi-process).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (manual multi-process).")
_XLA_CACHE = flags.DEFINE_string(
    "xla_cache_dir", os.environ.get("MEDTRANSFER_XLA_CACHE", "~/.cache/medtransfer_jax/xla"),
    "JAX's persistent compilation cache: a second run (sweep, study, restart after a "
    "preemption) of the same shapes reads its compiled programs from here; '' disables. "
    "JAX_COMPILATION_CACHE_DIR, when set, wins.")


class QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax/grain/etils (hundreds of lines per checkpoint) and
    JAX's line about each absent platform ("Unable to initialize backend 'tpu'")."""

    def filter(self, record):
        if record.levelno >= pylogging.WARNING:
            return True
        if "xla_bridge" in record.pathname and "Unable to initialize backend" in str(
                record.msg):
            return False
        return not any(s in record.pathname for s in ("/orbax/", "/grain/", "/etils/"))


def _wants_traceback(argv: Sequence[str]) -> bool:
    """--verbosity>=1 / -v 1 on the raw command line (flags may not have parsed)."""
    for i, a in enumerate(argv):
        m = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", a)
        if m:
            val = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv)
                                                             else "0")
            try:
                return int(val) >= 1
            except ValueError:
                return False
    return False


def fail(command: str, message: str) -> None:
    """Prints ``command: error: message`` (one line) and exits with status 2."""
    line = " ".join(str(message).split())
    print(f"{command}: error: {line}", file=sys.stderr, flush=True)
    sys.exit(2)


def stopped(command: str, reason: str, checkpoints: bool = True) -> None:
    """Prints how to resume a stopped job and exits 143 (the SIGTERM convention);
    ``checkpoints``: whether the job saves its progress (train, sweep, study) or only
    writes its outputs at the end (analyze, evaluate, convert)."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    again = f"python -m medtransfer_jax.{command} {args}".rstrip()
    if checkpoints:
        print(f"{command}: stopped ({reason}); finished work and the last checkpoint are "
              f"saved. Resume with the same command: {again}", file=sys.stderr, flush=True)
    else:
        print(f"{command}: stopped ({reason}); it keeps no checkpoint, so the outputs it "
              f"had not written yet are lost. Run it again from the start: {again}",
              file=sys.stderr, flush=True)
    sys.exit(interrupts.EXIT_CODE)


#: What shrinks a step, in each main's own flags (out_of_memory).
SMALLER_STEP = {
    "train": "--config.train.batch_size (and --config.eval.batch_size) or "
             "--config.data.image_size",
    "evaluate": "--batch_size (or --image_size)",
    "analyze": "--batch_size",
    "sweep": "train.batch_size / eval.batch_size with --override=KEY=VALUE",
    "study": "train.batch_size / eval.batch_size in the study config's target overrides",
    "bench": "--batch_sizes (or --image_sizes)",
}


def out_of_memory(e: BaseException, command: str) -> Optional[str]:
    """The one line for XLA's RESOURCE_EXHAUSTED out of memory (a batch or image too
    large for the device), with what to lower in ``command``'s flags; None otherwise (a
    RESOURCE_EXHAUSTED that is a quota, not memory, stays the library's error)."""
    text = str(e)
    first = next((ln.strip() for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln), "")
    if "memory" not in first.lower():
        return None
    import jax   # only on this error path: a flag error should not wait for jax
    return (f"out of {jax.default_backend().upper()} memory ({first[:200]}); lower "
            f"{SMALLER_STEP.get(command, 'the batch or image size')}, or use a device with "
            "more memory")


def _flag_error_message(e: Exception, argv: Sequence[str]) -> str:
    """One line for an exception raised while parsing flags (incl. loading --config)."""
    text = str(e)
    name = getattr(e, "flagname", "") or ""
    head, dot, rest = name.partition(".")
    if isinstance(e, flags.UnrecognizedFlagError) and dot and head != "config" \
            and "config" in FLAGS and difflib.get_close_matches(head, ["config"], cutoff=0.6):
        return f"{text}; did you mean --config.{rest}?"   # --confg.train.lr=0.1
    if isinstance(e, flags.UnrecognizedFlagError) and getattr(e, "flagname", "") \
            and e.flagname.startswith("config.") and "config" in FLAGS:
        try:
            cfg = FLAGS["config"].value
        except Exception:  # the config itself failed to load: report the flag only
            cfg = None
        if cfg is not None:
            given = next((a for a in argv if a.lstrip("-").startswith(e.flagname)), e.flagname)
            return configs.unknown_field_message(cfg, e.flagname[len("config."):], given)
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is not None and any(a.startswith("--config.") for a in argv):
        try:  # a config file given with a misspelled override: name the field, not a repr
            unknown = _unknown_override(configs.load(spec), argv)
        except UserError:
            unknown = None
        if unknown:
            return unknown
    cause = e.__cause__ or e.__context__
    if "Traceback (most recent call last)" in text:  # config_flags embeds get_config's
        last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
        last = re.sub(r"^(ValueError|KeyError|TypeError): ", "", last)
        given = next((a for a in argv if a.startswith("--config=")), "--config")
        return f"{given}: {last}"
    m = re.search(r"Attempted \[[^\]]*\]:\s*(\S+)\s*(\[Errno[^\n]*)", text)
    if m:
        return (f"--config={m.group(1)}: config file not found ({m.group(2).strip()}); "
                f"{configs.missing_file_hint(m.group(1))}")
    if cause is not None and not isinstance(e, flags.Error):
        text = f"{text} ({cause})"
    return text


def define_config_file(command: str, default: str, help_: str, **kwargs):
    """``config_flags.DEFINE_config_file('config', ...)`` that reports bad input as a user error.

    config_flags reads ``sys.argv`` for ``--config.a.b=v`` overrides when the flag is
    *defined* (at import of the main), so an unknown field fails there, before
    :func:`run` parses anything; this catches that and names the field.
    """
    try:
        return config_flags.DEFINE_config_file("config", default, help_, **kwargs)
    except Exception as e:  # noqa: BLE001 (import-time failure = a bad flag)
        if _wants_traceback(sys.argv):
            raise
        fail(command, _config_define_message(default, e))


def _config_define_message(default: str, e: Exception) -> str:
    spec = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), default)
    try:
        cfg = configs.load(spec)
    except UserError as load_error:
        return str(load_error)
    return _unknown_override(cfg, sys.argv[1:]) or f"--config={spec}: {e}"


def _unknown_override(cfg, argv: Sequence[str]) -> Optional[str]:
    """The message for the first ``--config.a.b=v`` of ``argv`` that ``cfg`` has no field
    for (with the closest field names), else None."""
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            key = a[len("--config."):].split("=", 1)[0]
            node = cfg
            for part in key.split("."):
                if not hasattr(node, "keys") or part not in node:
                    return configs.unknown_field_message(cfg, key, a)
                node = node[part]
    return None


def _parser(command: str) -> Callable[[List[str]], List[str]]:
    def parse(argv: List[str]) -> List[str]:
        try:
            rest = FLAGS(argv)
            if "config" in FLAGS and FLAGS["config"].value is not None:
                FLAGS["config"].value.keys()  # a config that failed to load raises here
            return rest
        except Exception as e:  # any failure here is a bad flag or a bad config file
            if _wants_traceback(argv):
                raise
            fail(command, _flag_error_message(e, argv))
    return parse


def _stop_at_once(command: str) -> Callable[[str], None]:
    """The stop of a job that keeps no state (a benchmark): its rows are already on
    stderr, so it ends at once (worker processes too) and promises no resume."""
    def stop(reason: str) -> None:
        print(f"{command}: stopped ({reason}); the rows above are what was measured, "
              "nothing else was kept", file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():
            child.terminate()
        sys.stdout.flush()
        os._exit(interrupts.EXIT_CODE)
    return stop


def run(main: Callable[[List[str]], None], command: str, *, quiet: bool = False,
        argv: Optional[List[str]] = None, resumable: bool = True,
        checkpoints: bool = True) -> None:
    """``absl.app.run(main)`` with this module's error, logging and signal conventions.

    Args:
      main: the main function; it raises :class:`UserError` / ``app.UsageError`` for
        bad input and :class:`interrupts.Interrupted` when stopped.
      command: the name in messages (``train`` -> ``train: error: ...``).
      quiet: log at WARNING unless the user gave ``--verbosity`` (orbax/grain are loud).
      argv: the command line (default ``sys.argv``).
      resumable: whether a stopped job can resume (False: benchmarks keep no state).
      checkpoints: whether it saves progress a rerun resumes from (False: analyze,
        evaluate and convert write their outputs at the end; a rerun starts over).
    """
    def wrapped(argv):
        if quiet and not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(QuietLibraries())
        try:
            with interrupts.graceful(None if resumable else _stop_at_once(command)):
                main(argv)
        except (UserError, app.UsageError) as e:
            if logging.get_verbosity() >= logging.DEBUG:
                raise
            fail(command, str(e))
        except interrupts.Interrupted as e:
            stopped(command, e.reason, checkpoints)
        except Exception as e:  # a library's error around the code a stop interrupted
            stop = interrupts.behind(e)
            if stop is not None:
                stopped(command, stop.reason, checkpoints)
            oom = out_of_memory(e, command)
            if oom is None or logging.get_verbosity() >= logging.DEBUG:
                raise
            fail(command, oom)

    app.run(wrapped, argv=argv, flags_parser=_parser(command))


def no_positional(argv: Sequence[str], usage: str = "") -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {list(argv[1:])}: options are --name=value "
                        f"flags{'; ' + usage if usage else ''}")


def require(value, flag: str, hint: str) -> None:
    if value in (None, "", []):
        raise UserError(f"{flag} is required: {hint}")


def check_choices(values: Sequence[str], allowed: Sequence[str], flag: str,
                  also: str = "") -> None:
    """UserError naming ``--flag``, the unknown values and the valid ones (``also``: a
    further accepted word such as 'all')."""
    bad = [v for v in values if v not in allowed]
    if bad:
        raise UserError(f"--{flag}={','.join(values)}: unknown {', '.join(map(repr, bad))}; "
                        f"choose from {', '.join(allowed)}" + (f", {also}" if also else ""))


def check_positive(value: Optional[float], name: str) -> None:
    if value is not None and float(value) <= 0:
        raise UserError(f"{name}={value}: must be a positive number")


def check_divisible(batch_size: int, num_devices: int, name: str) -> None:
    if num_devices and int(batch_size) % num_devices:
        raise UserError(f"{name}={batch_size} is not divisible by the {num_devices} devices; "
                        f"use a multiple of {num_devices} (e.g. "
                        f"{max(num_devices, int(batch_size) // num_devices * num_devices)})")


def check_output_dir(path: str, flag: str) -> str:
    """Checks that ``path`` can be (or is) a writable directory; creates nothing.

    Raises:
      UserError: ``path`` is a file, or it (or its nearest existing parent) is not
        writable (read-only mount, permissions).
    """
    if "://" in path:  # gs:// etc.: checked by the library that writes there
        return path
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{flag}={path} is a file, not a directory; give a directory path")
    probe = full
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag}={path}: {probe} is a file, so the directory cannot be created")
    try:  # a real write: os.access says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        where = "is" if probe == full else f"cannot be created: {probe}"
        raise UserError(f"{flag}={path} {where} not writable ({e.strerror}); choose a "
                        "writable directory") from None
    return full


def enable_compile_cache() -> str:
    """Turns on JAX's persistent compilation cache at ``--xla_cache_dir`` (every main that
    compiles calls this before its first computation); returns the directory ('' = off)."""
    from medtransfer_jax import compile_cache  # noqa: E402 (imports jax: after jax.config)
    return compile_cache.enable(_XLA_CACHE.value)


def init_distributed() -> int:
    """``jax.distributed.initialize`` per the multi-host flags; returns this process index.
    Turns the persistent compilation cache on first.

    Imports JAX here, not at the top: the mains set ``jax.config`` options first.
    """
    enable_compile_cache()
    from medtransfer_jax import sharding  # noqa: E402 (jax after jax.config)
    kwargs = {k: v for k, v in dict(coordinator_address=_COORD.value,
                                    num_processes=_NPROC.value,
                                    process_id=_PID.value).items() if v is not None}
    sharding.maybe_initialize_distributed(force=_MULTIHOST.value, **kwargs)
    import jax
    return jax.process_index()


def multihost_flags() -> List[str]:
    """The multi-host flags as given, to pass on to child training processes."""
    out = ["--multihost"] if _MULTIHOST.value else []
    for name in ("coordinator_address", "num_processes", "process_id"):
        if FLAGS[name].present:
            out.append(f"--{name}={FLAGS[name].value}")
    return out
