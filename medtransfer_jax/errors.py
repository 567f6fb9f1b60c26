"""The bottom-layer home of :class:`UserError`: bad input, reported as a message.

Every layer raises a subclass of :class:`UserError` (``DataError``, ``CheckpointError``,
``StudyError``, :class:`ConfigError`, ...) when the *input* is wrong (a missing folder,
a corrupt file, an unknown config field) and its message already names the
file/flag/layer and the fix. This module imports nothing from the project, so any
layer can subclass it without importing upward; the one place that turns these
exceptions into ``cmd: error: ...`` + exit 2 is :mod:`medtransfer_jax.cli`.
"""
from __future__ import annotations


class UserError(ValueError):
    """Input the user can fix; the message is one line saying what and how.

    A ``ValueError`` so code written against the older ``ValueError``-based errors
    keeps catching it.
    """


class ConfigError(UserError):
    """A config file, argument or override that cannot be used."""


class WorkdirError(UserError):
    """A workdir / output directory that cannot be used (a file, read-only, in use)."""


class TooFewDatapoints(UserError):
    """Activations a similarity method cannot compare: fewer datapoints (images x
    positions) than the neurons CCA whitens. The fix is the user's: more images or
    positions, fewer channels, or a CKA method."""
