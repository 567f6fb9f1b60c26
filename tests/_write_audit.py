"""Test-only: runs ``python -m medtransfer_jax.train`` recording every file write.

``python tests/_write_audit.py AUDIT_FILE [train flags...]`` appends one JSON line
``{"process": P, "path": ..., "how": ...}`` to ``AUDIT_FILE`` for each write through
medtransfer_jax.paths (atomic writes, appends) and each ``open`` for writing, where P is
the ``--process_id`` flag (0 without it; read from argv so that nothing initialises JAX
before ``jax.distributed.initialize``). The multi-process test uses it to prove that
shared files have exactly one writer, process 0.
"""
import builtins
import json
import os
import sys

from medtransfer_jax import paths


def _process() -> int:
    for arg in sys.argv:
        if arg.startswith("--process_id="):
            return int(arg.split("=", 1)[1])
    return 0


def install(audit_file: str) -> None:
    process = _process()
    real_open = builtins.open

    def record(path, how):
        with real_open(audit_file, "a") as f:
            f.write(json.dumps({"process": process, "path": os.fspath(path), "how": how}) + "\n")

    def wrap(name):
        fn = getattr(paths, name)

        def wrapped(path, *a, **k):
            record(path, name)
            return fn(path, *a, **k)
        return wrapped

    for name in ("write_text_atomic", "write_bytes_atomic", "append_text"):
        setattr(paths, name, wrap(name))

    def audited_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            record(file, f"open:{mode}")
        return real_open(file, mode, *a, **k)

    builtins.open = audited_open


def main():
    install(os.path.abspath(sys.argv.pop(1)))
    from absl import app

    from medtransfer_jax import train
    app.run(train.main)


if __name__ == "__main__":
    main()
