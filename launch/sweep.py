"""Deprecated: the sweep is ``python -m medtransfer_jax.sweep`` (same flags; --root is --output_dir)."""
from medtransfer_jax import cli, sweep
cli.run(sweep.main, "sweep", quiet=True)
