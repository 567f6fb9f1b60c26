"""launch/ scripts against recorded stubs of gcloud, python, nvidia-smi, srun and scontrol.

The gcloud stub is a small fake Cloud TPU: it keeps queued-resource / node states
from a scenario, records every call, and runs `tpu-vm ssh --command=...` for real in
one fake home directory per worker (a stub `hostname` names each worker), so the
detached jobs, per-host logs, exit statuses, `stop` and the resume loop are exercised
end to end. Deleting a slice wipes the worker homes, as a new VM would start empty.
Nothing here has touched a real Cloud TPU, GPU or Slurm cluster.
"""
import json
import re
import os
import subprocess
import sys
import time

import pytest

from _train_utils import REPO

STUB = r'''#!__PYTHON__
"""Multi-call stub: behaves as gcloud / python / hostname / nvidia-smi / srun / scontrol."""
import fcntl, json, os, shutil, signal, subprocess, sys, time

ROOT = os.environ["STUB_ROOT"]
NAME = os.path.basename(sys.argv[0])
ARGS = sys.argv[1:]


def cfg():
    with open(os.path.join(ROOT, "scenario.json")) as f:
        return json.load(f)


def record(**extra):
    line = json.dumps(dict(prog=NAME, args=ARGS, **extra)) + "\n"
    with open(os.path.join(ROOT, "calls.jsonl"), "a") as f:
        f.write(line)


def take(key, default):
    """Pops the next value of scenario[key] (a list; its last value repeats).

    Detached jobs on several fake workers call this at the same time, so the
    read-modify-write of state.json holds a lock and replaces the file atomically.
    """
    path = os.path.join(ROOT, "state.json")
    seq = cfg().get(key)
    if seq is None:
        return default
    with open(os.path.join(ROOT, "state.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.load(open(path)) if os.path.exists(path) else {}
        i = state.get(key, 0)
        state[key] = i + 1
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)
    return seq[min(i, len(seq) - 1)]


def flag(name, default=None):
    for a in ARGS:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def worker_homes():
    n = cfg().get("workers", 2)
    return [os.path.join(ROOT, f"w{i}") for i in range(n)]


def gcloud():
    args = [a for a in ARGS if not a.startswith("--")]
    if args and args[0] == "alpha":
        args = args[1:]
    record()
    kind, verb = args[2], args[3]           # compute tpus <kind> <verb>
    if verb == "describe":
        key = "qr_states" if kind == "queued-resources" else "node_states"
        state = take(key, "READY")
        if state == "MISSING":
            print("ERROR: NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        print(f"state:\n  state: {state}" if flag("--format", "").startswith("yaml") else state)
        return
    if verb in ("create", "delete"):
        rc = take(f"{kind}_{verb}_exit", 0)
        if verb == "delete" and rc == 0:
            for h in worker_homes():
                shutil.rmtree(h, ignore_errors=True)
        sys.exit(rc)
    if verb == "scp":
        src, dest = args[4], args[5].split(":", 1)[1]
        for h in worker_homes():
            os.makedirs(h, exist_ok=True)
            shutil.copy(src, os.path.join(h, dest))
        return
    if verb == "ssh":
        rc = take("ssh_exit", 0)
        if rc:
            print("ssh: connect to host: Connection refused", file=sys.stderr)
            sys.exit(rc)
        worker = flag("--worker", "all")
        homes = worker_homes()
        chosen = range(len(homes)) if worker == "all" else [int(worker)]
        worst = 0
        for i in chosen:
            os.makedirs(homes[i], exist_ok=True)
            env = dict(os.environ, HOME=homes[i], FAKE_HOSTNAME=f"t1v-w{i}", WORKER_ID=str(i),
                       NUM_WORKERS=str(len(homes)))
            p = subprocess.run(["bash", "-c", flag("--command")], cwd=homes[i], env=env,
                               stdin=subprocess.DEVNULL)
            worst = worst or p.returncode
        sys.exit(worst)
    sys.exit(f"gcloud stub: unhandled {ARGS}")


def python():
    c = cfg()
    if ARGS[:1] == ["-c"]:       # setup_worker.sh's version probe, local_gpus.sh's import check
        record()
        if ARGS[1].startswith("import medtransfer_jax") and c.get("import_error"):
            sys.exit("Traceback (most recent call last):\n  ...\n" + c["import_error"])
        sys.exit(0 if c.get("py_ok", {}).get(NAME, True) else 1)
    if ARGS[:1] == ["--version"]:
        print("Python 3.12.7")
        return
    if ARGS[:2] == ["-m", "venv"]:
        record()
        os.makedirs(os.path.join(ARGS[2], "bin"), exist_ok=True)
        os.symlink(sys.argv[0], os.path.join(ARGS[2], "bin", "python"))
        return
    if ARGS[:2] == ["-m", "pip"]:
        record()
        if "--user" in ARGS and "uv" in ARGS:
            d = os.path.join(os.environ["HOME"], ".local", "bin")
            os.makedirs(d, exist_ok=True)
            os.symlink(sys.argv[0].replace(NAME, "uv"), os.path.join(d, "uv"))
        sys.exit(c.get("pip_exit", 0))
    if ARGS[:1] == ["-"]:                   # setup_worker.sh check
        sys.stdin.read()
        wid, n = os.environ.get("WORKER_ID", "0"), os.environ.get("NUM_WORKERS", "1")
        platform = c.get("platform", {}).get(wid, "tpu")
        print(f"MEDTRANSFER_CHECK host=t1v-w{wid} python=3.12.7 jax=0.10.2 process={wid}/{n} "
              f"local_devices=4 global_devices={4 * int(n)} platform={platform}")
        if ARGS[1] != "any" and platform != ARGS[1]:
            sys.exit(f"check: error: t1v-w{wid}: JAX sees {platform} devices, expected {ARGS[1]}")
        if ARGS[3]:
            record(worker=wid)
            if not c.get("write_ok", {}).get(wid, True):
                sys.exit(f"check: error: t1v-w{wid}: cannot write {ARGS[3]}: Forbidden")
        return
    # A training / sweep process.
    wid = os.environ.get("WORKER_ID", "0")
    record(worker=wid, env={k: os.environ[k] for k in ("JAX_LOCAL_DEVICE_IDS",) if k in os.environ},
           pid=os.getpid())
    job = take(f"job_w{wid}", {"exit": 0})
    signal.signal(signal.SIGTERM, lambda *a: (print("SIGTERM: checkpoint saved", flush=True),
                                              sys.exit(job.get("on_term", 143))))
    print(f"training on worker {wid}", flush=True)
    deadline = time.time() + job.get("sleep", 0)
    while time.time() < deadline:
        time.sleep(0.05)
    sys.exit(job.get("exit", 0))


def uv():
    record()
    if ARGS[:2] == ["python", "find"]:
        print(os.path.join(os.path.dirname(os.path.realpath(sys.argv[0])), "python3.12"))


def main():
    if NAME == "gcloud":
        gcloud()
    elif NAME == "hostname":
        print(os.environ.get("FAKE_HOSTNAME", "localhost"))
    elif NAME.startswith("python"):
        python()
    elif NAME == "uv":
        uv()
    elif NAME == "nvidia-smi":
        record()
        for i in range(cfg().get("gpus", 2)):
            print(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:04d})")
    elif NAME == "srun":
        record()
        sys.exit(cfg().get("srun_exit", 0))
    elif NAME == "scontrol":
        record()
    else:
        sys.exit(f"stub: unknown program {NAME}")


main()
'''

STUBBED = ("gcloud", "hostname", "python", "python3", "python3.11", "python3.12", "python3.13",
           "uv", "nvidia-smi", "srun", "scontrol")


class Fake:
    """A stub bin directory, a scenario and the calls the scripts made."""

    def __init__(self, tmp_path, scenario):
        self.root = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        stub = self.bin / "_stub"
        stub.write_text(STUB.replace("__PYTHON__", sys.executable))
        stub.chmod(0o755)
        for name in STUBBED:
            (self.bin / name).symlink_to(stub)
        self.set(scenario)

    def set(self, scenario):
        (self.root / "scenario.json").write_text(json.dumps(scenario))
        (self.root / "state.json").unlink(missing_ok=True)

    def home(self, i, with_code=True, with_venv=True):
        """Worker i's home, set up as `tpu_vm.sh setup` would leave it."""
        h = self.root / f"w{i}"
        h.mkdir(exist_ok=True)
        if with_code and not (h / "medtransfer_jax").exists():
            (h / "medtransfer_jax").symlink_to(REPO)
        if with_venv:
            (h / "medtransfer_venv" / "bin").mkdir(parents=True, exist_ok=True)
            py = h / "medtransfer_venv" / "bin" / "python"
            if not py.exists():
                py.symlink_to(self.bin / "_stub")
        return h

    def run(self, script, *args, env=None, timeout=60):
        e = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}", STUB_ROOT=str(self.root),
                 MEDTRANSFER_POLL_S="0.1", MEDTRANSFER_FOLLOW="0", HOME=str(self.root / "laptop"),
                 TMPDIR=str(self.root))
        e.pop("CUDA_VISIBLE_DEVICES", None)
        e.pop("GCP_PROJECT", None)
        e.update(env or {})
        return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], env=e,
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def calls(self, prog=None):
        path = self.root / "calls.jsonl"
        rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if prog is None or r["prog"] == prog]

    def gcloud(self, *words):
        """gcloud calls whose non-flag words contain ``words`` in order."""
        out = []
        for r in self.calls("gcloud"):
            plain = [a for a in r["args"] if not a.startswith("--")]
            if all(w in plain for w in words):
                out.append(r["args"])
        return out

    def train_starts(self):
        return [r for r in self.calls() if r["prog"] == "python"
                and r["args"][:2] in (["-m", "medtransfer_jax.train"], ["-m", "medtransfer_jax.sweep"])]


@pytest.fixture
def fake(tmp_path):
    return Fake(tmp_path, {"workers": 2})


def _stop_jobs(fake):
    """Best-effort cleanup of detached fake jobs left by a failing test."""
    for i in range(4):
        for pid in (fake.root / f"w{i}" / "medtransfer_jobs").glob("*/pid"):
            try:
                os.killpg(int(pid.read_text()), 9)
            except (ProcessLookupError, ValueError, PermissionError):
                pass


# ---------------------------------------------------------------------------------------
# Creating slices: runtime version per generation, provisioning modes, autocheckpoint.

@pytest.mark.parametrize("accel,version,autocheckpoint", [
    ("v4-32", "tpu-ubuntu2204-base", True),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", True),
    ("v5p-8", "v2-alpha-tpuv5", False),
    ("v6e-8", "v2-alpha-tpuv6e", False),
])
def test_queue_runtime_version_and_autocheckpoint_per_generation(fake, accel, version,
                                                                 autocheckpoint):
    p = fake.run("tpu_vm.sh", "queue", "t", "us-central2-b", accel, "--no-wait")
    assert p.returncode == 0, p.stderr
    (call,) = fake.gcloud("queued-resources", "create")
    assert f"--runtime-version={version}" in call and "--node-id=t" in call and "t-qr" in call
    assert f"--accelerator-type={accel}" in call and "--spot" in call
    assert "--scopes=https://www.googleapis.com/auth/cloud-platform" in call
    assert ("--autocheckpoint-enabled" in call) == autocheckpoint
    assert (call[0] == "alpha") == autocheckpoint   # the flag exists in gcloud alpha only


@pytest.mark.parametrize("mode,flag,alpha", [("guaranteed", "--guaranteed", False),
                                             ("reserved", "--reserved", False),
                                             ("best-effort", "--best-effort", True)])
def test_queue_provisioning_modes(fake, mode, flag, alpha):
    p = fake.run("tpu_vm.sh", "queue", "t", "z", "v6e-8", f"--mode={mode}", "--no-wait",
                 "--version=v2-alpha-tpuv6e")
    assert p.returncode == 0, p.stderr
    (call,) = fake.gcloud("queued-resources", "create")
    assert flag in call and "--spot" not in call and (call[0] == "alpha") == alpha


def test_create_modes_and_user_errors(fake):
    p = fake.run("tpu_vm.sh", "create", "t", "z", "v4-8", "--mode=spot", "--autocheckpoint=off")
    assert p.returncode == 0, p.stderr
    (call,) = fake.gcloud("tpu-vm", "create")
    assert call[0] == "compute" and "--spot" in call and "--version=tpu-ubuntu2204-base" in call
    for args, needle in [(("create", "t", "z", "v4-8", "--mode=guaranteed"), "--mode=guaranteed"),
                         (("queue", "t", "z", "v9x-8"), "--version="),
                         (("queue", "t", "z"), "accelerator type"),
                         (("queue", "t", "z", "v4-8", "--bogus=1"), "--bogus"),
                         (("train", "t"), "NAME ZONE"),
                         (("frobnicate", "t", "z"), "unknown command 'frobnicate'")]:
        p = fake.run("tpu_vm.sh", *args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.startswith("tpu_vm.sh: error:") and needle in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    assert len(fake.gcloud("create")) == 1


@pytest.mark.parametrize("states,rc,needle", [
    (["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], 0, "t-qr is ACTIVE"),
    (["WAITING_FOR_RESOURCES", "FAILED"], 1, "is FAILED"),
    (["PROVISIONING", "SUSPENDED"], 1, "is SUSPENDED"),
    (["ACTIVE", "SUSPENDING"], 0, "is ACTIVE"),
])
def test_queue_waits_for_active_and_exits_on_failed_states(fake, states, rc, needle):
    fake.set({"workers": 1, "qr_states": states})
    p = fake.run("tpu_vm.sh", "queue", "t", "z", "v4-8")
    assert p.returncode == rc, p.stdout + p.stderr
    assert needle in p.stdout + p.stderr
    if rc:
        assert "tpu_vm.sh delete t z" in p.stderr        # says how to free the request
    final = needle.split()[-1]
    assert len(fake.gcloud("queued-resources", "describe")) >= states.index(final) + 1


def test_wait_ready_times_out(fake):
    fake.set({"workers": 1, "qr_states": ["WAITING_FOR_RESOURCES"]})
    p = fake.run("tpu_vm.sh", "wait-ready", "t", "z", "--timeout=1")
    assert p.returncode == 1 and "after 1s" in p.stderr


def test_delete_removes_queued_resource_with_its_tpu(fake):
    fake.set({"workers": 1, "qr_states": ["ACTIVE"]})
    p = fake.run("tpu_vm.sh", "delete", "t", "z")
    assert p.returncode == 0, p.stderr
    (call,) = fake.gcloud("queued-resources", "delete")
    assert "t-qr" in call and "--force" in call and "--quiet" in call
    assert not fake.gcloud("tpu-vm", "delete")


def test_delete_plain_tpu_without_queued_resource(fake):
    fake.set({"workers": 1, "qr_states": ["MISSING"], "tpu-vm_delete_exit": [0]})
    p = fake.run("tpu_vm.sh", "delete", "t", "z")
    assert p.returncode == 0, p.stderr
    assert fake.gcloud("tpu-vm", "delete") and not fake.gcloud("queued-resources", "delete")
    fake.set({"workers": 1, "qr_states": ["MISSING"], "tpu-vm_delete_exit": [1]})
    assert fake.run("tpu_vm.sh", "delete", "t", "z").returncode == 1


# ---------------------------------------------------------------------------------------
# Jobs: detached, per-host logs, exit statuses, stop.

def test_train_propagates_remote_exit_status(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "job_w0": [{"exit": 0}], "job_w1": [{"sleep": 0.3, "exit": 3}]})
    p = fake.run("tpu_vm.sh", "train", "t", "z", "--",
                 "--config=configs/revisiting/breast.py:imagenet,fold=1",
                 "--workdir=gs://bucket/runs/b1")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "exit status 3" in p.stdout
    starts = fake.train_starts()
    assert len(starts) == 2 and {s["worker"] for s in starts} == {"0", "1"}
    assert starts[0]["args"] == ["-m", "medtransfer_jax.train", "--multihost",
                                 "--config=configs/revisiting/breast.py:imagenet,fold=1",
                                 "--workdir=gs://bucket/runs/b1"]
    # Per-host logs on each worker, with the exit status at the end.
    for i in (0, 1):
        log = (fake.root / f"w{i}" / "medtransfer_jobs" / "train" / f"t1v-w{i}.log").read_text()
        assert f"training on worker {i}" in log
        assert f"exit status {3 if i else 0}" in log


def test_train_success_and_preemption_status(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "job_w0": [{"exit": 0}, {"exit": 143}], "job_w1": [{"exit": 0}, {"exit": 0}]})
    assert fake.run("tpu_vm.sh", "train", "t", "z", "--", "--workdir=gs://b/r").returncode == 0
    p = fake.run("tpu_vm.sh", "train", "t", "z", "--", "--workdir=gs://b/r")
    assert p.returncode == 143, p.stdout + p.stderr     # a preemption is never a success


def test_failure_on_one_worker_stops_the_others(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "job_w0": [{"sleep": 60}], "job_w1": [{"exit": 7}]})
    try:
        t0 = time.time()
        p = fake.run("tpu_vm.sh", "train", "t", "z", "--", "--workdir=gs://b/r")
        assert p.returncode == 7, p.stdout + p.stderr
        assert "stopping it on the others" in p.stderr and time.time() - t0 < 30
        status = fake.run("tpu_vm.sh", "status", "t", "z")
        assert "host=t1v-w0 job=train state=stopped" in status.stdout
    finally:
        _stop_jobs(fake)


def test_detached_train_then_status_logs_stop_wait(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "job_w0": [{"sleep": 60}], "job_w1": [{"sleep": 60}]})
    try:
        p = fake.run("tpu_vm.sh", "train", "t", "z", "--detach", "--job=b1", "--", "--workdir=gs://b/r")
        assert p.returncode == 0, p.stderr
        assert "runs detached" in p.stdout
        time.sleep(0.5)
        p = fake.run("tpu_vm.sh", "status", "t", "z", "--job=b1")
        assert p.stdout.count("state=running") == 2, p.stdout
        p = fake.run("tpu_vm.sh", "logs", "t", "z", "--job=b1")
        assert "----- t1v-w0" in p.stdout and "----- t1v-w1" in p.stdout
        assert "training on worker 1" in p.stdout
        p = fake.run("tpu_vm.sh", "logs", "t", "z", "--job=b1", "--worker=1", "--lines=5")
        assert "----- t1v-w1" in p.stdout and "t1v-w0" not in p.stdout
        # A second start with the same job name is refused while it runs.
        p = fake.run("tpu_vm.sh", "train", "t", "z", "--detach", "--job=b1", "--", "--workdir=x")
        assert p.returncode == 1 and "still running" in p.stderr
        p = fake.run("tpu_vm.sh", "stop", "t", "z", "--job=b1", "--grace=10")
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("state=stopped rc=143") == 2, p.stdout   # SIGTERM -> save -> 143
        p = fake.run("tpu_vm.sh", "wait", "t", "z", "--job=b1")
        assert p.returncode == 130 and "exit status 130" in p.stdout
        log = (fake.root / "w0" / "medtransfer_jobs" / "b1" / "t1v-w0.log").read_text()
        assert "SIGTERM: checkpoint saved" in log
    finally:
        _stop_jobs(fake)


def test_wait_reports_preempted_slice(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "ssh_exit": [0, 255], "node_states": ["PREEMPTED"],
              "job_w0": [{"sleep": 60}], "job_w1": [{"sleep": 60}]})
    try:
        p = fake.run("tpu_vm.sh", "train", "t", "z", "--", "--workdir=gs://b/r")
        assert p.returncode == 75, p.stdout + p.stderr
        assert "PREEMPTED" in p.stderr
    finally:
        _stop_jobs(fake)


def test_sweep_runs_module_on_every_worker(fake):
    fake.home(0), fake.home(1)
    p = fake.run("tpu_vm.sh", "sweep", "t", "z", "--", "--study=revisiting", "--root=gs://b/s")
    assert p.returncode == 0, p.stderr
    for s in fake.train_starts():
        assert s["args"] == ["-m", "medtransfer_jax.sweep", "--multihost", "--parallel=1",
                             "--study=revisiting", "--root=gs://b/s"]


def test_mount_is_for_data_and_allows_directory_renames(fake):
    fake.home(0)
    fake.set({"workers": 1})
    p = fake.run("tpu_vm.sh", "mount", "t", "z", "gs://bucket")
    assert p.returncode == 2 and "without gs://" in p.stderr
    fake.run("tpu_vm.sh", "mount", "t", "z", "bucket")
    (call,) = fake.gcloud("ssh")
    command = [a for a in call if a.startswith("--command=")][0]
    assert "gcsfuse --implicit-dirs --rename-dir-limit=" in command and "bucket /mnt/gcs" in command


# ---------------------------------------------------------------------------------------
# Setup and device checks.

def test_setup_worker_installs_python312_venv_and_pinned_stack(fake, tmp_path):
    # The image's pythons are all too old: uv (from PyPI) installs a managed 3.12.
    fake.set({"py_ok": {"python3": False, "python3.11": False, "python3.12": False,
                        "python3.13": False}})
    home = tmp_path / "laptop"
    home.mkdir()
    p = fake.run("setup_worker.sh", "tpu")
    assert p.returncode == 0, p.stdout + p.stderr
    pips = [r["args"] for r in fake.calls("python3") if "pip" in r["args"]]
    assert pips[0][-2:] == ["--upgrade", "uv"] and "--user" in pips[0]
    uv = [r["args"] for r in fake.calls("uv")]
    assert ["python", "install", "3.12"] in uv
    installs = [r["args"] for r in fake.calls("python") if "install" in r["args"]]
    jax_pin = [l for l in open(os.path.join(REPO, "launch", "constraints.txt"))
               if l.startswith("jax==")][0].strip().split("==")[1]
    final = installs[-1]
    assert "-c" in final and final[final.index("-c") + 1] == "launch/constraints.txt"
    assert f"jax[tpu]=={jax_pin}" in final and final[-2:] == ["-e", ".[gcs]"]
    assert "MEDTRANSFER_CHECK" in p.stdout and "platform=tpu" in p.stdout
    assert (home / "medtransfer_venv" / "bin" / "python").exists()


def test_setup_worker_check_fails_loudly_without_the_accelerator(fake, tmp_path):
    fake.set({"platform": {"0": "cpu"}})
    fake.home(0)
    p = fake.run("setup_worker.sh", "check", "tpu", env={"HOME": str(tmp_path / "w0")})
    assert p.returncode == 1 and "JAX sees cpu devices, expected tpu" in p.stderr
    p = fake.run("setup_worker.sh", "check", "tpu", env={"HOME": str(tmp_path / "nowhere")})
    assert p.returncode == 1 and "no venv" in p.stderr


def test_tpu_setup_copies_code_installs_and_checks_every_worker(fake):
    fake.set({"workers": 2})
    p = fake.run("tpu_vm.sh", "setup", "t", "z", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all 2 workers of t see their TPUs" in p.stdout
    for i in (0, 1):
        h = fake.root / f"w{i}"
        assert (h / "medtransfer_jax" / "launch" / "worker_job.sh").exists()
        assert not (h / "medtransfer_jax" / ".git").exists()
        assert (h / "medtransfer_venv" / "bin" / "python").exists()
    checks = [c for c in fake.gcloud("ssh") if any("check tpu --distributed" in a for a in c)]
    assert len(checks) == 1 and "--worker=all" in checks[0]


def test_tpu_check_writes_to_the_bucket_from_every_worker(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "write_ok": {"1": False}})
    p = fake.run("tpu_vm.sh", "check", "t", "z", "--bucket=gs://b/runs")
    assert p.returncode == 1 and "cannot write gs://b/runs" in p.stderr
    writes = [r for r in fake.calls("python") if r["args"][:1] == ["-"]]
    assert [r["args"][3] for r in writes] == ["gs://b/runs"] * 2
    p = fake.run("tpu_vm.sh", "check", "t", "z", "--bucket=b/runs")
    assert p.returncode == 2 and "give a gs:// URL" in p.stderr


def test_setup_worker_check_runs_for_real_on_this_cpu(tmp_path):
    """The device/bucket check itself (not a stub): real JAX on CPU, a local folder as the
    bucket."""
    env = dict(os.environ, MEDTRANSFER_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    script = os.path.join(REPO, "launch", "setup_worker.sh")
    p = subprocess.run(["bash", script, "check", "cpu", f"--write-test={tmp_path}/probe"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "platform=cpu" in p.stdout and "process=0/1" in p.stdout and "can write" in p.stdout
    assert (tmp_path / "probe").is_dir() and not list((tmp_path / "probe").iterdir())
    p = subprocess.run(["bash", script, "check", "tpu"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "JAX sees cpu devices, expected tpu" in p.stderr
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "file").write_text("x")
    p = subprocess.run(["bash", script, "check", "any", f"--write-test={tmp_path}/ro/file"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "cannot write" in p.stderr


def test_tpu_check_fails_when_a_worker_lacks_its_tpu(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "platform": {"1": "cpu"}})
    p = fake.run("tpu_vm.sh", "check", "t", "z")
    assert p.returncode == 1 and "device check failed" in p.stderr
    assert "JAX sees cpu devices" in p.stderr


# ---------------------------------------------------------------------------------------
# Resume: re-create a preempted queued slice and re-run the same command.

def test_resume_recreates_suspended_slice_and_reruns_same_command(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2,
              # run 1 on the existing ACTIVE slice; then it is SUSPENDED (preempted);
              # after delete + queue it is ACTIVE again.
              "qr_states": ["ACTIVE", "SUSPENDED", "SUSPENDED", "ACTIVE"],
              "node_states": ["READY"],
              "job_w0": [{"exit": 143}, {"exit": 0}], "job_w1": [{"exit": 143}, {"exit": 0}]})
    args = ["--config=configs/revisiting/breast.py:imagenet,fold=0", "--workdir=gs://b/run"]
    p = fake.run("tpu_vm.sh", "resume", "t", "z", "v5litepod-16", "--max-restarts=3", "--", *args,
                 timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "restart 1 of 3" in p.stdout and "finished" in p.stdout
    starts = fake.train_starts()
    assert len(starts) == 4                       # 2 workers x 2 runs
    assert all(s["args"] == ["-m", "medtransfer_jax.train", "--multihost", *args] for s in starts)
    (delete,) = fake.gcloud("queued-resources", "delete")
    assert "--force" in delete
    (create,) = fake.gcloud("queued-resources", "create")
    assert "--spot" in create and "--autocheckpoint-enabled" in create
    assert fake.gcloud("scp")                     # the new slice was set up again


def test_resume_does_not_retry_a_real_failure(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "qr_states": ["ACTIVE"], "node_states": ["READY"],
              "job_w0": [{"exit": 1}], "job_w1": [{"exit": 1}]})
    p = fake.run("tpu_vm.sh", "resume", "t", "z", "v4-8", "--", "--workdir=gs://b/run")
    assert p.returncode == 1 and "not retrying" in p.stderr
    assert len(fake.train_starts()) == 2 and not fake.gcloud("delete")


def test_resume_gives_up_after_max_restarts(fake):
    fake.home(0), fake.home(1)
    fake.set({"workers": 2, "qr_states": ["ACTIVE"], "node_states": ["READY"],
              "job_w0": [{"exit": 143}], "job_w1": [{"exit": 143}]})
    p = fake.run("tpu_vm.sh", "resume", "t", "z", "v4-8", "--max-restarts=1", "--",
                 "--workdir=gs://b/run")
    assert p.returncode == 1 and "gave up after 1 restarts" in p.stderr
    assert len(fake.train_starts()) == 4


# ---------------------------------------------------------------------------------------
# GPUs and Slurm.

def test_local_gpus_multiproc_one_process_per_gpu(fake):
    p = fake.run("local_gpus.sh", "multiproc", "--", "--workdir=/tmp/x", env={"PORT": "23456"})
    assert p.returncode == 0, p.stderr
    starts = sorted(fake.train_starts(), key=lambda s: s["env"]["JAX_LOCAL_DEVICE_IDS"])
    assert [s["env"]["JAX_LOCAL_DEVICE_IDS"] for s in starts] == ["0", "1"]
    assert [s["args"] for s in starts] == [
        ["-m", "medtransfer_jax.train", "--coordinator_address=localhost:23456",
         "--num_processes=2", f"--process_id={i}", "--workdir=/tmp/x"] for i in range(2)]
    assert fake.calls("nvidia-smi")[0]["args"] == ["-L"]


def test_local_gpus_refuses_more_processes_than_gpus(fake):
    p = fake.run("local_gpus.sh", "multiproc", "--", "--workdir=/tmp/x", env={"NPROC": "3"})
    assert p.returncode == 2 and not fake.train_starts()
    assert p.stderr.startswith("local_gpus.sh: error: NPROC=3 but only 2 GPU(s)")
    p = fake.run("local_gpus.sh", "multiproc", "--", "--workdir=/tmp/x",
                 env={"NPROC": "2", "CUDA_VISIBLE_DEVICES": "3"})
    assert p.returncode == 2 and "only 1 GPU(s) are visible (3)" in p.stderr
    fake.set({"gpus": 0})
    p = fake.run("local_gpus.sh", "multiproc", "--")
    assert p.returncode == 2 and "no GPU visible" in p.stderr


def test_local_gpus_failed_process_leaves_no_orphan(fake):
    # The stub picks a behaviour by WORKER_ID; give process i the i-th one.
    wrapper = fake.root / "pywrap"
    wrapper.write_text(f'#!/usr/bin/env bash\nexport WORKER_ID=$JAX_LOCAL_DEVICE_IDS\n'
                       f'exec {fake.bin}/python "$@"\n')
    wrapper.chmod(0o755)
    fake.set({"job_w0": [{"sleep": 60}], "job_w1": [{"sleep": 0.3, "exit": 5}]})
    t0 = time.time()
    p = fake.run("local_gpus.sh", "multiproc", "--", "--workdir=/tmp/x",
                 env={"PYTHON": str(wrapper), "GRACE_S": "5"})
    assert p.returncode == 5, p.stderr
    assert "stopping the others" in p.stderr and time.time() - t0 < 20
    pids = [s["pid"] for s in fake.train_starts()]
    assert len(pids) == 2
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_local_gpus_default_is_one_process(fake):
    p = fake.run("local_gpus.sh", "train", "--", "--workdir=/tmp/x")
    assert p.returncode == 0, p.stderr
    (start,) = fake.train_starts()
    assert start["args"] == ["-m", "medtransfer_jax.train", "--workdir=/tmp/x"]
    assert "JAX_LOCAL_DEVICE_IDS" not in start["env"]


@pytest.mark.parametrize("srun_exit,rc,requeued", [(0, 0, False), (143, 0, True), (1, 1, False)])
def test_slurm_example_uses_auto_detection_and_requeues_after_checkpoint(fake, srun_exit, rc,
                                                                         requeued):
    fake.set({"srun_exit": srun_exit})
    p = fake.run("slurm_example.sbatch", "configs/revisiting/breast.py:imagenet,fold=0",
                 "runs/b0", "--config.train.batch_size=64",
                 env={"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(fake.root)})
    assert p.returncode == rc, p.stdout + p.stderr
    (srun,) = fake.calls("srun")
    a = srun["args"]
    assert "--kill-on-bad-exit=1" in a
    i = a.index("-m")
    assert a[i - 1].endswith("medtransfer_venv/bin/python")
    # No coordinator flags: jax.distributed.initialize() reads SLURM_* itself.
    assert a[i:] == ["-m", "medtransfer_jax.train", "--multihost",
                     "--config=configs/revisiting/breast.py:imagenet,fold=0",
                     "--workdir=runs/b0", "--config.train.batch_size=64"]
    assert [c["args"] for c in fake.calls("scontrol")] == ([["requeue", "4242"]] if requeued else [])
    header = open(os.path.join(REPO, "launch", "slurm_example.sbatch")).read()
    assert "#SBATCH --signal=TERM@" in header and "#SBATCH --requeue" in header


def test_scripts_pass_shell_syntax_check():
    for name in ("tpu_vm.sh", "local_gpus.sh", "worker_job.sh", "setup_worker.sh",
                 "slurm_example.sbatch"):
        p = subprocess.run(["bash", "-n", os.path.join(REPO, "launch", name)],
                           capture_output=True, text=True)
        assert p.returncode == 0, (name, p.stderr)
        text = open(os.path.join(REPO, "launch", name)).read()
        assert "set -euo pipefail" in text, name


def test_pinned_jax_reads_local_device_ids_from_the_environment():
    """local_gpus.sh relies on jax.distributed.initialize() taking JAX_LOCAL_DEVICE_IDS
    as its local_device_ids (which restricts the CUDA devices a process sees)."""
    from _train_utils import free_port, subprocess_env

    code = ("import jax; jax.distributed.initialize("
            f"coordinator_address='localhost:{free_port()}', num_processes=1, process_id=0); "
            "print('visible', jax.config.values['jax_cuda_visible_devices']); jax.distributed.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=subprocess_env(JAX_LOCAL_DEVICE_IDS="1", JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert "visible 1" in out.stdout


def test_training_flags_must_follow_double_dash(fake):
    for args in (("train", "t", "z", "--workdir=gs://b/r"), ("train", "t", "z", "runs/x")):
        p = fake.run("tpu_vm.sh", *args)
        assert p.returncode == 2 and "go after --" in p.stderr, p.stderr
    assert not fake.calls()


# ---------------------------------------------------------------------------------------
# Input checked before gcloud or python is called: usage, required flags, option values.

def _refused(fake, p, needle, script="tpu_vm.sh"):
    """Exit 2, one line naming the problem, and nothing called (gcloud, python, ssh)."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith(f"{script}: error:") and p.stderr.count("\n") == 1, p.stderr
    assert needle in p.stderr, p.stderr
    assert not [c for c in fake.calls() if c["prog"] != "nvidia-smi"], fake.calls()


def _dispatched_commands(script):
    """The commands a script accepts, read from its `case $cmd in` validation line."""
    text = open(os.path.join(REPO, "launch", script)).read()
    (line,) = re.findall(r"^  ((?:[a-z-]+\|)+[a-z-]+)\) ;;$", text, re.M)
    return set(line.split("|"))


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",), ("help",)])
def test_tpu_vm_usage_lists_every_command(fake, args):
    p = fake.run("tpu_vm.sh", *args)
    assert p.returncode == 0 and not p.stderr, p.stderr
    shown = set(re.findall(r"^  launch/tpu_vm\.sh (\S+) ", p.stdout, re.M))
    commands = _dispatched_commands("tpu_vm.sh")
    assert len(commands) == 15 and shown == commands, commands ^ shown
    assert "launch/tpu_vm.sh delete NAME ZONE" in p.stdout
    assert "set -euo" not in p.stdout and not p.stdout.startswith("!")   # the header only
    assert "polling interval" in p.stdout                                  # ... all of it
    assert not fake.calls()


@pytest.mark.parametrize("args,needle", [
    (("train", "n", "z"), "'train' needs --workdir"),
    (("train", "n", "z", "--"), "-- --workdir=gs://BUCKET/run"),
    (("train", "n", "z", "--", "--config=configs/revisiting/breast.py:imagenet"), "needs --workdir"),
    (("train", "n", "z", "--", "--workdir="), "needs --workdir"),
    (("train", "n", "z", "--", "--workdir"), "needs --workdir"),
    (("train", "n", "z", "--", "--", "--workdir=x"), "needs --workdir"),   # not a flag after --
    (("resume", "n", "z", "v4-8", "--", "--config=x"), "'resume' needs --workdir"),
    (("train", "n", "z", "runs/x", "--", "--workdir=x"), "unexpected argument 'runs/x'"),
    (("logs", "n", "z", "--worker=x"), "--worker=x: give all or a worker number"),
    (("logs", "n", "z", "--worker=-1"), "--worker=-1"),
    (("logs", "n", "z", "--worker"), "--worker needs a value"),
    (("ssh", "n", "z", "--worker=1a", "--", "hostname"), "--worker=1a"),
    (("logs", "n", "z", "--lines=ten"), "--lines=ten is not a whole number"),
    (("stop", "n", "z", "--grace=5m"), "--grace=5m is not a whole number"),
    (("wait-ready", "n", "z", "--timeout=1h"), "--timeout=1h"),
    (("resume", "n", "z", "v4-8", "--max-restarts=many", "--", "--workdir=x"), "--max-restarts"),
    (("train", "n", "z", "--job=a b", "--", "--workdir=x"), "--job=a b: a job name"),
    (("status", "n", "z", "--job=../x"), "--job=../x"),
    (("train", "n", "z", "--detach=yes", "--", "--workdir=x"), "--detach takes no value"),
])
def test_tpu_vm_refuses_bad_input_before_calling_gcloud(fake, args, needle):
    _refused(fake, fake.run("tpu_vm.sh", *args), needle)


@pytest.mark.parametrize("flags", [("--workdir", "gs://b/r"), ("-workdir=gs://b/r",),
                                   ("--config=c.py", "--flagfile=f.txt")])
def test_tpu_vm_train_accepts_every_absl_workdir_form(fake, flags):
    fake.home(0), fake.home(1)
    p = fake.run("tpu_vm.sh", "train", "t", "z", "--", *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    starts = fake.train_starts()
    assert len(starts) == 2 and starts[0]["args"] == ["-m", "medtransfer_jax.train", "--multihost",
                                                      *flags]


def test_tpu_vm_sweep_needs_no_flags_and_worker_numbers_pass(fake):
    fake.home(0), fake.home(1)
    # medtransfer_jax.sweep requires no flag (--output_dir defaults to runs): not refused.
    p = fake.run("tpu_vm.sh", "sweep", "t", "z", "--")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [s["args"] for s in fake.train_starts()] == [
        ["-m", "medtransfer_jax.sweep", "--multihost", "--parallel=1"]] * 2
    for worker in ("0", "1", "all"):
        p = fake.run("tpu_vm.sh", "logs", "t", "z", "--job=sweep", f"--worker={worker}", "--lines=0")
        assert p.returncode == 0, p.stderr
        assert f"--worker={worker}" in fake.gcloud("ssh")[-1]


def test_tpu_vm_failed_ssh_at_job_start_names_both_causes(fake):
    fake.set({"workers": 2, "ssh_exit": [1]})
    p = fake.run("tpu_vm.sh", "train", "t", "z", "--", "--workdir=gs://b/r")
    assert p.returncode == 1 and not fake.train_starts()
    assert "still running" in p.stderr and "'tpu_vm.sh ssh t z -- hostname'" in p.stderr


@pytest.mark.parametrize("arg", ["--help", "-h", "help"])
def test_local_gpus_help_prints_usage(fake, arg):
    p = fake.run("local_gpus.sh", arg)
    assert p.returncode == 0 and not p.stderr, p.stderr
    for command in ("train", "multiproc", "sweep"):
        assert f"launch/local_gpus.sh {command} -- " in p.stdout
    assert "ALLOW_CPU=1" in p.stdout and "PYTHON=" in p.stdout and "set -euo" not in p.stdout
    assert not fake.calls()


def test_local_gpus_usage_errors(fake):
    _refused(fake, fake.run("local_gpus.sh"), "usage: local_gpus.sh train|multiproc|sweep",
             "local_gpus.sh")
    _refused(fake, fake.run("local_gpus.sh", "--bogus"), "unknown command '--bogus'",
             "local_gpus.sh")


def test_local_gpus_train_refuses_cpu_unless_allowed(fake):
    fake.set({"gpus": 0})
    p = fake.run("local_gpus.sh", "train", "--", "--workdir=/tmp/x")
    _refused(fake, p, "train: no GPU visible", "local_gpus.sh")
    assert "ALLOW_CPU=1" in p.stderr and fake.calls("nvidia-smi")
    p = fake.run("local_gpus.sh", "train", "--", "--workdir=/tmp/x", env={"ALLOW_CPU": "1"})
    assert p.returncode == 0, p.stderr
    (start,) = fake.train_starts()
    assert start["args"] == ["-m", "medtransfer_jax.train", "--workdir=/tmp/x"]
    # A GPU named by CUDA_VISIBLE_DEVICES counts, as for multiproc and sweep.
    p = fake.run("local_gpus.sh", "train", "--", "--workdir=/tmp/x", env={"CUDA_VISIBLE_DEVICES": "0"})
    assert p.returncode == 0 and len(fake.train_starts()) == 2


@pytest.mark.parametrize("cmd,module", [("train", "medtransfer_jax.train"),
                                        ("multiproc", "medtransfer_jax.train"),
                                        ("sweep", "medtransfer_jax.sweep")])
def test_local_gpus_checks_python_imports_the_main_first(fake, cmd, module):
    fake.set({"gpus": 2, "import_error": "ModuleNotFoundError: No module named 'absl'"})
    p = fake.run("local_gpus.sh", cmd, "--", "--workdir=/tmp/x")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"local_gpus.sh: error: PYTHON=python cannot import {module} "
                               "(ModuleNotFoundError: No module named 'absl'); set PYTHON")
    assert [c["args"][:2] for c in fake.calls("python")] == [["-c", f"import {module}"]]
    assert not fake.train_starts()
    p = fake.run("local_gpus.sh", cmd, "--", "--workdir=/tmp/x", env={"PYTHON": "/no/such/python"})
    assert p.returncode == 2 and "PYTHON=/no/such/python: no such program" in p.stderr
    assert p.stderr.count("\n") == 1 and not fake.train_starts()


def test_local_gpus_import_check_with_real_interpreters(fake, tmp_path):
    """A real venv without the dependencies is refused in one line; the test's own
    interpreter passes the check and runs the real main (which rejects the config)."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                   timeout=60)
    env = {"ALLOW_CPU": "1", "PYTHON": str(bare / "bin" / "python"), "JAX_PLATFORMS": "cpu"}
    p = fake.run("local_gpus.sh", "train", "--", "--workdir=/tmp/x", env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "cannot import medtransfer_jax.train (ModuleNotFoundError: No module named" in p.stderr
    env["PYTHON"] = sys.executable
    p = fake.run("local_gpus.sh", "train", "--", f"--workdir={tmp_path}/run",
                 "--config=no_such_config.py", env=env, timeout=120)
    assert p.returncode == 2 and "train: error: --config=no_such_config.py" in p.stderr, p.stderr
    assert "local_gpus.sh" not in p.stderr
