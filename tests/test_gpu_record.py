"""launch/gpu_record.sh, rehearsed without a GPU.

A GPU session has ~15 minutes of device time in all; a misspelled flag or a part that
outgrows the 10-minute per-call limit would waste most of it. So every `bench` line of
the script is parsed here with the real absl flags and the bench's own validation, and
each part's timeouts must fit one call with room for start-up and the wheel install.
"""
import pathlib
import re
import shlex
import subprocess
import sys

import _train_utils

SCRIPT = pathlib.Path(_train_utils.REPO) / "launch" / "gpu_record.sh"
#: One device call may run 600 s; leave this much for pip, nvidia-smi and JAX start-up.
CALL_LIMIT_S, STARTUP_S = 600, 60


def _bench_lines():
    """(part, name, seconds, args) for every `bench NAME SECONDS ARGS...` in the script."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    part, out = None, []
    for line in text.splitlines():
        m = re.search(r'"\$PART" = (part\d)', line)
        if m:
            part = m.group(1)
        words = shlex.split(line, comments=True)
        if words[:1] == ["bench"] and len(words) > 3:
            args = [w.replace("$PWD", _train_utils.REPO) for w in words[3:]]
            out.append((part, words[1], int(words[2]), args))
    return out


_PARSE = """
import sys
from absl import flags
from medtransfer_jax.bench import cli
argv = flags.FLAGS(["bench", *sys.argv[1:]])
assert len(argv) == 2 and argv[1] in cli.WHATS, argv
cli._validate(argv[1])
print("OK", argv[1])
"""


def test_every_bench_line_parses_with_the_real_flags():
    lines = _bench_lines()
    assert {name for _, name, _, _ in lines} >= {"train", "device_input", "pipeline",
                                                  "network_scale", "grid"}, lines
    for part, name, _, args in lines:
        p = subprocess.run([sys.executable, "-c", _PARSE, *args], capture_output=True,
                           text=True, timeout=120, env=_train_utils.subprocess_env())
        assert p.returncode == 0 and "OK" in p.stdout, (part, name, args, p.stderr[-2000:])


def test_each_part_fits_one_device_call():
    per_part = {}
    for part, _, seconds, _ in _bench_lines():
        assert part in ("part1", "part2"), "a bench line outside part1/part2"
        per_part[part] = per_part.get(part, 0) + seconds
    assert set(per_part) == {"part1", "part2"}
    for part, total in per_part.items():
        assert total <= CALL_LIMIT_S - STARTUP_S, (part, total)


def test_a_flag_the_bench_does_not_know_is_caught():
    p = subprocess.run([sys.executable, "-c", _PARSE, "grid", "--no_such_flag=1"],
                       capture_output=True, text=True, timeout=120,
                       env=_train_utils.subprocess_env())
    assert p.returncode != 0 and "no_such_flag" in p.stderr
