"""A stop (interrupts.Interrupted) that a library re-raised as its own error is still a
stop: exit 143 with the resume line, and a sweep's run is 'stopped', never 'failed'."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import _train_utils
from medtransfer_jax import interrupts
from medtransfer_jax.training import loop, sweep


class _StopOnCompare:
    """Pytree metadata whose comparison is where the signal lands (as in CI)."""

    def __hash__(self):
        return 1

    def __eq__(self, other):
        raise interrupts.Interrupted("SIGTERM")


@jax.tree_util.register_pytree_node_class
class _Box:
    def __init__(self, x, meta):
        self.x, self.meta = x, meta

    def tree_flatten(self):
        return (self.x,), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(children[0], meta)


def _jax_wrapped_stop() -> BaseException:
    """The error JAX raises when a stop lands in its pytree metadata comparison."""
    f = jax.jit(lambda b: b.x + 1)
    f(_Box(jnp.ones(2), _StopOnCompare()))
    try:
        f(_Box(jnp.ones(2), _StopOnCompare()))
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("JAX did not compare the metadata")


def test_behind_finds_the_stop_a_library_wrapped():
    e = _jax_wrapped_stop()
    assert not isinstance(e, interrupts.Interrupted)  # JAX's own error, ours as its cause
    assert interrupts.behind(e).reason == "SIGTERM"
    assert interrupts.behind(ValueError("a real error")) is None
    looped = ValueError("a")
    looped.__context__ = KeyError("b")
    looped.__context__.__context__ = looped
    assert interrupts.behind(looped) is None


MAIN = """
import sys
from medtransfer_jax import cli, interrupts
def main(argv):
    if sys.argv[-1] == "--flag=stop":
        raise ValueError("library error") from interrupts.Interrupted("SIGTERM")
    raise ValueError("a real error")
cli.run(main, "study")
"""


@pytest.mark.parametrize("what", ["stop", "error"])
def test_main_exits_143_for_a_wrapped_stop_and_still_fails_on_real_errors(what):
    script = "from absl import flags\nflags.DEFINE_string('flag', '', '')\n" + MAIN
    p = subprocess.run([sys.executable, "-c", script, f"--flag={what}"], capture_output=True,
                       text=True, timeout=120, env=_train_utils.subprocess_env())
    if what == "stop":
        assert p.returncode == interrupts.EXIT_CODE, p.stderr[-2000:]
        assert "study: stopped (SIGTERM)" in p.stderr and "Resume with the same command" in p.stderr
        assert "Traceback" not in p.stderr
    else:
        assert p.returncode == 1 and "a real error" in p.stderr


def test_a_sweep_run_whose_stop_was_wrapped_is_stopped_not_failed(tmp_path, monkeypatch):
    def train(config, workdir):
        raise ValueError("library error") from interrupts.Interrupted("SIGTERM")

    monkeypatch.setattr(loop, "train_and_evaluate", train)
    run = sweep.Run("r", _train_utils.TINY_CONFIG, str(tmp_path / "r"))
    with pytest.raises(interrupts.Interrupted, match="run r: SIGTERM"):
        sweep._run_inprocess(run)

    def broken(config, workdir):
        raise ValueError("a real error")

    monkeypatch.setattr(loop, "train_and_evaluate", broken)
    assert sweep._run_inprocess(run) == "failed:ValueError"


def test_a_stopped_main_without_checkpoints_does_not_promise_a_resume():
    """analyze, evaluate and convert write their outputs at the end: a stop loses what was
    not written, and the line says so (it promised 'the last checkpoint')."""
    script = MAIN.replace('cli.run(main, "study")', 'cli.run(main, "analyze", checkpoints=False)')
    script = "from absl import flags\nflags.DEFINE_string('flag', '', '')\n" + script
    p = subprocess.run([sys.executable, "-c", script, "--flag=stop"], capture_output=True,
                       text=True, timeout=120, env=_train_utils.subprocess_env())
    assert p.returncode == interrupts.EXIT_CODE, p.stderr[-2000:]
    assert "analyze: stopped (SIGTERM); it keeps no checkpoint" in p.stderr
    assert "checkpoint are saved" not in p.stderr and "Run it again from the start" in p.stderr


def test_out_of_device_memory_is_one_line_saying_what_to_lower():
    """XLA's RESOURCE_EXHAUSTED (the paper's batch of 256 on a small device) was a raw
    traceback; it is one line naming the flags that shrink the step."""
    script = MAIN.replace(
        'raise ValueError("a real error")',
        'raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 42416121664 '
        'bytes.\\nmore detail")').replace('cli.run(main, "study")', 'cli.run(main, "train")')
    script = "from absl import flags\nflags.DEFINE_string('flag', '', '')\n" + script
    p = subprocess.run([sys.executable, "-c", script, "--flag=oom"], capture_output=True,
                       text=True, timeout=120, env=_train_utils.subprocess_env())
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ": error: " in ln]
    assert lines == [lines[0]] and lines[0].startswith("train: error: out of CPU memory "
                                                       "(RESOURCE_EXHAUSTED: Out of memory")
    assert "--config.train.batch_size" in lines[0] and "Traceback" not in p.stderr


def test_out_of_memory_advice_names_each_mains_own_flags_and_skips_quotas():
    from medtransfer_jax import cli
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 42416121664 bytes.")
    assert "--batch_size (or --image_size)" in cli.out_of_memory(oom, "evaluate")
    assert "--override=KEY=VALUE" in cli.out_of_memory(oom, "sweep")
    assert "target overrides" in cli.out_of_memory(oom, "study")
    assert "--config.train.batch_size" not in cli.out_of_memory(oom, "analyze")
    quota = RuntimeError("RESOURCE_EXHAUSTED: Quota exceeded for quota metric 'Requests'")
    assert cli.out_of_memory(quota, "train") is None
    assert cli.out_of_memory(ValueError("a real error"), "train") is None
