"""Test-only fault injection for the training loop (kept out of the production path).

In-process: ``loop.train_and_evaluate(cfg, wd, hooks=[Fault('term', 5)])``.
Subprocess: ``python tests/_train_faults.py kill:7 [train flags...]`` runs
``python -m medtransfer_jax.train`` with that fault (several: ``kill:7,term:3``).

Kinds: ``kill:N`` SIGKILL right after step N's update (before any save of step N);
``kill_after_save:N`` SIGKILL right after step N's checkpoint save was started (async
saves are then in flight); ``term:N`` SIGTERM to itself at step N (the loop saves and
stops).
"""
import os
import signal
import sys

import jax

KINDS = ("kill", "kill_after_save", "term")


class Fault:
    """A loop hook (training.periodic.Hook) that interrupts the run at ``step``."""

    def __init__(self, kind: str, step: int):
        if kind not in KINDS:
            raise ValueError(f"fault kind {kind!r} not in {KINDS}")
        self.kind, self.step = kind, int(step)

    def after_step(self, step, state):
        if step != self.step:
            return
        if self.kind == "kill":
            jax.block_until_ready(state)
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)

    def after_save(self, step):
        if step == self.step and self.kind == "kill_after_save":
            os.kill(os.getpid(), signal.SIGKILL)


def parse(spec: str):
    """'kill:7,term:3' -> [Fault('kill', 7), Fault('term', 3)]."""
    out = []
    for part in filter(None, spec.split(",")):
        kind, _, at = part.partition(":")
        out.append(Fault(kind, int(at)))
    return out


def main():
    import functools

    from absl import app

    from medtransfer_jax import train
    from medtransfer_jax.training import loop
    hooks = parse(sys.argv.pop(1))
    loop.train_and_evaluate = functools.partial(loop.train_and_evaluate, hooks=hooks)
    app.run(train.main)


if __name__ == "__main__":
    main()
