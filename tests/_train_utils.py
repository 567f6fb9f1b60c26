"""Shared helpers of the training tests: a persistent XLA cache and tiny configs.

The cache matters on a 2-core machine: compiling a ResNet's init and train step takes
tens of seconds, and the resume/multi-process tests start several fresh processes that
compile the same programs (a cached executable is the same binary, so results are
unchanged).
"""
import os
import socket

import jax

CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/medtransfer_test_xla_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "_train_tiny_config.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def subprocess_env(**extra):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    env.pop("MEDTRANSFER_FAULT", None) if "MEDTRANSFER_FAULT" not in extra else None
    return env
