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
    return env


def tiny_resnet_and_batches(num_classes: int, batch_size: int, num_batches: int):
    """ResNet18 width 8 (dropout 0.5, BN momentum 0.9), its initial variables as NumPy, and
    seeded random 32 px batches: the shared setup of the train-step tests."""
    import numpy as np

    from medtransfer_jax.models import resnet
    model = resnet.ResNet(depth=18, width=8, num_classes=num_classes, dropout_rate=0.5,
                          bn_momentum=0.9)
    variables = jax.device_get(resnet.init_variables(model, jax.random.PRNGKey(0), 32))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
                "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
                "weight": np.ones(batch_size, np.float32)} for _ in range(num_batches)]
    return model, variables, batches


def one_error_line(p, command: str, *expect: str) -> str:
    """The one ``command: error: ...`` line of a main that failed on bad input: exit 2, no
    traceback, and every ``expect`` in that line. Returns the line."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), p.stderr[-3000:]
    for e in expect:
        assert e in lines[0], (e, lines[0])
    return lines[0]
