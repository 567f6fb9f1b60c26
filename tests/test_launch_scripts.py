"""launch/ scripts build the right commands (gcloud / python replaced by recorders on PATH)."""
import os
import stat
import subprocess

from _train_utils import REPO


def _recorder(bin_dir, name, log):
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name} $*" >> {log}\n'
                + ('[ "$1" = "--query-gpu=index" ] && printf "0\\n1\\n"\n'
                   if name == "nvidia-smi" else "") + "exit 0\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _run(tmp_path, script, *args, env_extra=None):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for name in ("gcloud", "python", "nvidia-smi"):
        _recorder(str(bin_dir), name, log)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **(env_extra or {}))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    p = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], env=env,
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    calls = log.read_text().splitlines() if log.exists() else []
    return p, calls


def test_tpu_train_runs_multihost_on_every_worker(tmp_path):
    p, calls = _run(tmp_path, "tpu_vm.sh", "train", "my-tpu", "us-central2-b", "--",
                    "--config=configs/revisiting/breast.py:imagenet,fold=1",
                    "--workdir=/mnt/gcs/runs/b1")
    assert p.returncode == 0, p.stderr
    assert len(calls) == 1
    call = calls[0]
    assert call.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b")
    assert "--worker=all" in call
    assert ("python3 -m medtransfer_jax.train --multihost "
            "--config=configs/revisiting/breast.py:imagenet\\,fold=1 "
            "--workdir=/mnt/gcs/runs/b1") in call


def test_tpu_unknown_command_fails(tmp_path):
    p, calls = _run(tmp_path, "tpu_vm.sh", "frobnicate", "n", "z")
    assert p.returncode == 2 and "unknown command frobnicate" in p.stderr and not calls


def test_local_gpus_multiproc_one_process_per_gpu(tmp_path):
    p, calls = _run(tmp_path, "local_gpus.sh", "multiproc", "--", "--workdir=/tmp/x",
                    env_extra={"PORT": "23456"})
    assert p.returncode == 0, p.stderr
    train = sorted(c for c in calls if c.startswith("python -m medtransfer_jax.train"))
    assert train == [
        f"python -m medtransfer_jax.train --coordinator_address=localhost:23456 "
        f"--num_processes=2 --process_id={i} --workdir=/tmp/x" for i in range(2)]
