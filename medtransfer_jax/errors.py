"""User-facing errors of the command-line mains: a message, not a traceback.

Bad input (a missing dataset folder, a corrupt image, an incompatible checkpoint, a bad
study config) raises one of :func:`user_error_types`, whose message already names the
path/layer/field and the fix. The mains run under :func:`reported_as_message`, which
prints that message and exits with status 2; ``--verbosity=1`` keeps the traceback.
"""
from __future__ import annotations

import contextlib
import sys


def user_error_types() -> tuple:
    # Local imports: the mains call this before heavy modules are needed.
    from medtransfer_jax.data.base import DataError
    from medtransfer_jax.weights.checkpoint import CheckpointError
    return DataError, CheckpointError


@contextlib.contextmanager
def reported_as_message(command: str):
    """Turns a user error raised inside the block into 'command: error: ...' + exit 2."""
    from absl import logging
    try:
        yield
    except user_error_types() as e:
        if logging.get_verbosity() >= logging.DEBUG:
            raise
        print(f"{command}: error: {e}\n(run with --verbosity=1 for the traceback)",
              file=sys.stderr, flush=True)
        sys.exit(2)
