"""The demo's start-up waste stays gone (issue #14, BENCHMARKS.md §6): no torch import on
the training path, one compiled eval step per run, model init without the forward pass --
each with the same results as before."""
import functools
import subprocess
import sys

import _train_utils
import jax
import jax.numpy as jnp
import numpy as np

from medtransfer_jax.models import resnet
from medtransfer_jax.training import loop, presets, run_setup


def test_training_path_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it can (1.5 s of a 25 s demo); the writer still
    writes its event file, and torch stays importable afterwards."""
    code = (
        "import importlib.util, os, sys\n"
        "from medtransfer_jax.training import loop, periodic\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        f"w = periodic.MetricWriter({str(tmp_path)!r}, None)\n"
        "w.write(1, 'train', {'loss': 0.5}); w.close()\n"
        f"assert os.listdir(os.path.join({str(tmp_path)!r}, 'tb')), 'no event file'\n"
        "assert 'torch' not in sys.modules\n"
        "assert importlib.util.find_spec('torch') is not None  # not left blocked\n"
        "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], env=_train_utils.subprocess_env(),
                       cwd=_train_utils.REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_final_evaluation_reuses_the_loops_eval_step(tmp_path, monkeypatch):
    handed = []  # every eval step Run.eval_step hands out (loop and final evaluation)
    real = run_setup.Run.eval_step
    monkeypatch.setattr(run_setup.Run, "eval_step",
                        lambda self, sh: handed.append(real(self, sh)) or handed[-1])
    c = presets.tiny_config()
    c.sharding.num_devices = 1
    c.train.num_steps = 4
    c.eval.every_steps = 2
    res = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert res["status"] == "done" and res["test"]["num_examples"] == res["num_test"]
    # the loop's and the final evaluation's: one jitted function, so one compiled program
    assert len(handed) >= 2 and all(f is handed[0] for f in handed)


def test_init_variables_equal_model_init():
    """Dropping the sown activations inside jit and compiling unoptimised change the
    program, not the weights: they equal an optimised ``model.init``'s up to float32
    rounding (a few ulp in the initialisers' erfinv), and repeat bit for bit."""
    model = resnet.ResNet(depth=18, width=8, num_classes=3, dropout_rate=0.5)
    rng = jax.random.PRNGKey(7)
    new = jax.device_get(resnet.init_variables(model, rng, 32))
    full = jax.jit(functools.partial(model.init, train=False))(rng, jnp.zeros((1, 32, 32, 3)))
    assert "activations" in full and "activations" not in new
    ref = jax.device_get({k: v for k, v in full.items() if k != "activations"})
    assert jax.tree.structure(new) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    again = jax.device_get(resnet.init_variables(model, rng, 32))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_init_program_is_compiled_unoptimised(monkeypatch):
    """The init's compile is start-up cost only: it asks XLA for no optimisation."""
    asked = []
    real_jit = jax.jit
    monkeypatch.setattr(resnet.jax, "jit", lambda f, **kw: asked.append(kw) or real_jit(f, **kw))
    resnet._jitted_init.cache_clear()
    try:
        resnet.init_variables(resnet.ResNet(depth=18, width=8, num_classes=2),
                              jax.random.PRNGKey(0), 32)
    finally:
        resnet._jitted_init.cache_clear()
    assert asked == [{"compiler_options": {"xla_backend_optimization_level": 0}}]


def test_runs_of_one_graph_in_a_process_share_their_compiled_steps(tmp_path):
    """A sweep's second run of the same graph reuses the first's jitted train and eval
    steps (no re-trace, no cache read); another lr is another program; and reuse carries
    no state: the repeated config trains to exactly the same weights-derived numbers."""
    from medtransfer_jax.training import program_cache
    program_cache.clear()

    def config(lr):
        c = presets.tiny_config()
        c.sharding.num_devices = 1
        c.train.num_steps, c.eval.every_steps, c.train.lr = 4, 2, lr
        return c

    first = loop.train_and_evaluate(config(1e-3), str(tmp_path / "a"))
    after_first = program_cache.stats()
    other = loop.train_and_evaluate(config(5e-3), str(tmp_path / "b"))
    after_other = program_cache.stats()
    again = loop.train_and_evaluate(config(1e-3), str(tmp_path / "c"))
    after_again = program_cache.stats()
    assert after_other["misses"] == after_first["misses"] + 1          # its own train step
    assert after_again["misses"] == after_other["misses"]              # nothing new built
    assert after_again["hits"] >= after_other["hits"] + 2              # train + eval reused
    assert again["compile_s"] < 0.5 * first["compile_s"], (first["compile_s"],
                                                           again["compile_s"])
    for split in ("val", "test"):
        assert again[split] == first[split], split
    assert other["test"] != first["test"]
    # more steps at a constant lr: the same program; a decaying schedule: a new one
    longer = config(1e-3)
    longer.train.num_steps = 6
    loop.train_and_evaluate(longer, str(tmp_path / "d"))
    assert program_cache.stats()["misses"] == after_again["misses"]
    cosine = config(1e-3)
    cosine.train.schedule = "cosine"
    loop.train_and_evaluate(cosine, str(tmp_path / "e"))
    assert program_cache.stats()["misses"] == after_again["misses"] + 1
