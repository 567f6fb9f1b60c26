"""launch/gpu_record.sh, rehearsed without a GPU.

A GPU session has ~15 minutes of device time in all, a machine start costs 1-2 of them
and a machine goes back 30 s after a call, so the script is one call. A misspelled flag
or benchmarks that outgrow the 10-minute call limit would waste the session. So every
`bench` line of the script is parsed here with the real absl flags and the bench's own
validation, and the benchmarks' timeouts together must fit one call with room for
start-up and the wheel install.
"""
import pathlib
import re
import shlex
import subprocess
import sys

import _train_utils

SCRIPT = pathlib.Path(_train_utils.REPO) / "launch" / "gpu_record.sh"
#: One device call may run 600 s; the script's header asks for timeout_s=600, and pip,
#: nvidia-smi and five JAX start-ups need some of that.
CALL_TIMEOUT_S, STARTUP_S = 600, 50


def _bench_lines():
    """(part, name, seconds, args) for every `bench NAME SECONDS ARGS...` in the script."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    part, out = None, []
    for line in text.splitlines():
        m = re.search(r'"\$PART" = (part\d)', line)
        if m:
            part = m.group(1)
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value bench ...
            words = words[1:]
        if words[:1] == ["bench"] and len(words) > 3:
            args = [w.replace("$PWD", _train_utils.REPO) for w in words[3:]]
            out.append((part, words[1], int(words[2]), args))
    return out


_PARSE = """
import sys
from absl import flags
from medtransfer_jax.analysis import similarity
from medtransfer_jax.bench import cli
# The script runs on a GPU: validate its GPU-only choices (cuSOLVER SVDs) as they will be
# there. An unknown algorithm is still refused.
_check = similarity.check_svd_algorithm
similarity.check_svd_algorithm = lambda svd, backend=None: _check(svd, backend="gpu")
argv = flags.FLAGS(["bench", *sys.argv[1:]])
assert len(argv) == 2 and argv[1] in cli.WHATS, argv
cli._validate(argv[1])
print("OK", argv[1])
"""


def test_every_bench_line_parses_with_the_real_flags():
    lines = _bench_lines()
    assert {args[0] for _, _, _, args in lines} == {"train", "step_profile", "similarity",
                                                     "network_scale", "grid"}, lines
    parts = [a.split("=", 1)[1].split(",") for _, _, _, args in lines
             if args[0] == "network_scale" for a in args if a.startswith("--parts=")]
    assert sorted(p for ps in parts for p in ps) == ["map"], parts
    for part, name, _, args in lines:
        p = subprocess.run([sys.executable, "-c", _PARSE, *args], capture_output=True,
                           text=True, timeout=120, env=_train_utils.subprocess_env())
        assert p.returncode == 0 and "OK" in p.stdout, (part, name, args, p.stderr[-2000:])


def test_all_benchmarks_fit_one_device_call():
    lines = _bench_lines()
    assert {part for part, _, _, _ in lines} == {"part1", "part2"}
    total = sum(seconds for _, _, seconds, _ in lines)
    assert total <= CALL_TIMEOUT_S - STARTUP_S, total
    assert "timeout_s=600" in SCRIPT.read_text()
    # the grid's own budget ends inside its timeout, so its TOTAL row is always printed
    (grid,) = [(s, a) for _, name, s, a in lines if name == "grid"]
    budget = [float(a.split("=", 1)[1]) for a in grid[1] if a.startswith("--time_budget_s=")]
    assert budget and budget[0] <= grid[0] - 20


def test_a_flag_the_bench_does_not_know_is_caught():
    p = subprocess.run([sys.executable, "-c", _PARSE, "grid", "--no_such_flag=1"],
                       capture_output=True, text=True, timeout=120,
                       env=_train_utils.subprocess_env())
    assert p.returncode != 0 and "no_such_flag" in p.stderr
    p = subprocess.run([sys.executable, "-c", _PARSE, "similarity",
                        "--svd_algorithms=default,gesvd"], capture_output=True, text=True,
                       timeout=120, env=_train_utils.subprocess_env())
    assert p.returncode != 0 and "gesvd" in p.stderr
