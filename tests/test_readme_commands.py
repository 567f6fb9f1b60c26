"""Every `python -m medtransfer_jax.<main> ...` command in README.md parses.

Docs drift silently: a renamed flag or config argument leaves a README command that
fails for the first reader who pastes it. Each command here goes through its main's
real absl flags (config files included: ml_collections loads a `--config=file.py:args`
while parsing, so a config argument the file no longer takes fails too). Nothing runs.
"""
import os
import re
import shlex
import subprocess
import sys

import _train_utils

README = os.path.join(_train_utils.REPO, "README.md")


def readme_commands():
    """(module, args) for each command in a ```bash block or an inline code span."""
    text = open(README).read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip().startswith("#"):
                lines.append(line.split(" #")[0].strip())
    lines += re.findall(r"`(python -m medtransfer_jax\.[^`]*)`", text)
    out = []
    for line in lines:
        if line.startswith("python -m medtransfer_jax.") and not line.endswith(".X"):
            words = shlex.split(line)
            out.append((words[2], words[3:]))
    return out


_PARSE = """
import importlib, sys
from absl import flags
mod, args = sys.argv[1], sys.argv[2:]
sys.argv = [mod, *args]  # config_flags registers --config.a.b overrides from sys.argv
importlib.import_module(mod + ".cli" if mod == "medtransfer_jax.bench" else mod)
flags.FLAGS(sys.argv)
print("OK")
"""


def _parse(module, args):
    return subprocess.Popen([sys.executable, "-c", _PARSE, module, *args],
                            cwd=_train_utils.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_train_utils.subprocess_env())


def test_every_readme_command_parses_with_its_mains_flags():
    commands = readme_commands()
    # The README documents each main; a section that lost its command shows up here.
    assert {m for m, _ in commands} >= {f"medtransfer_jax.{m}" for m in (
        "train", "study", "convert", "analyze", "evaluate", "sweep", "bench")}, commands
    failed = []
    for i in range(0, len(commands), 2):  # two at a time: CI has 2 cores
        procs = [(c, _parse(*c)) for c in commands[i:i + 2]]
        for (module, args), p in procs:
            out, err = p.communicate(timeout=300)
            if p.returncode or "OK" not in out:
                failed.append(f"{module} {' '.join(args)}: {err.strip().splitlines()[-1:]}")
    assert not failed, "\n".join(failed)


def test_a_misspelled_flag_would_be_caught():
    p = _parse("medtransfer_jax.train", ["--workdir=/tmp/x", "--config.train.num_stepz=2"])
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "num_stepz" in err
