"""Two local processes x 4 CPU devices train exactly like one process x 8 devices (gloo collectives
over 127.0.0.1): per-step losses, checkpoints that restore on one process, --resume; bad cluster
flags are one-line errors."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import flaxlora
from flaxlora.training.distributed import Cluster

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "qqp.py"
PAIRS = (["How do I learn Python quickly?", "What is the capital of France?"],
         ["What is the fastest way to learn Python?", "Which city is the capital of Germany?"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, args: list[str], timeout: int = 900, script=lambda i: SCRIPT) -> list[str]:
    """Run experiments/qqp.py (or ``script(i)`` as process i) as ``processes`` processes sharing 8 CPU
    devices; their outputs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
    port = free_port()
    cluster = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),  # noqa: E731
                         "--process-id", str(i)] if processes > 1 else []
    procs = [subprocess.Popen([sys.executable, str(script(i)), *args, *cluster(i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(processes)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def run_args(data_dir, out, mesh, lora_path, steps=3, *extra):
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", str(steps), "--log-every", "1",
            "--save-every", "2", "--batch-size", "16", "--max-length", "32", "--buckets", "32",
            "--eval-batch-size", "16", "--eval-examples", "16", "--eval-every", "0", "--seed", "1", "--members", "1", "--quiet",
            "--mesh", mesh, "--lora-path", lora_path, *extra]


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "split" not in r]


@pytest.mark.parametrize("mesh, lora_path", [("data=2,fsdp=4", "merged"), ("tensor=8", "factored")])
def test_two_processes_train_like_one(data_dir, tmp_path, mesh, lora_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, run_args(data_dir, one, mesh, lora_path))
    outputs = launch(2, run_args(data_dir, two, mesh, lora_path))
    if mesh == "data=2,fsdp=4":  # as if stopped after the step-2 save: resume on the same 2-process topology
        shutil.rmtree(two / "checkpoints" / "3")
        outputs = launch(2, run_args(data_dir, two, mesh, lora_path, 3, "--resume"))
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    assert len(losses(two)) == 3
    assert ["outputs" in out for out in outputs] == [True, False]  # only process 0 prints the summary
    assert json.loads((two / "results.json").read_text())["steps"] == 3
    # The checkpoint both processes wrote restores in this single process, like the 1-process run's.
    np.testing.assert_allclose(flaxlora.restore(two).logits(*PAIRS), flaxlora.restore(one).logits(*PAIRS),
                               rtol=1e-4, atol=1e-5)


LATE = """import runpy, sys, time
import flaxlora.qqp.run as run
check_model = run.check_model
def late(config):  # this process reaches the output-folder check after the others have started writing
    time.sleep(8)
    check_model(config)
run.check_model = late
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_a_slow_process_sees_the_output_folder_as_the_others_did(data_dir, tmp_path):
    late = tmp_path / "late.py"
    late.write_text(LATE.format(script=str(SCRIPT)))
    launch(2, run_args(data_dir, tmp_path / "out", "data=2,fsdp=4", "factored", 1),
           script=lambda i: late if i == 1 else SCRIPT)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["steps"] == 1


def test_a_dcn_axis_across_processes_trains_like_one_mesh(data_dir, tmp_path):
    """--mesh fsdp=4 --dcn-mesh data=2 on 2 processes (processes stand in for TPU slices): data across
    them, fsdp within each, the same losses as data=2,fsdp=4 in one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, run_args(data_dir, one, "data=2,fsdp=4", "factored", 2))
    launch(2, run_args(data_dir, two, "fsdp=4", "factored", 2, "--dcn-mesh", "data=2"))
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    done = subprocess.run([sys.executable, str(SCRIPT), *run_args(data_dir, tmp_path / "bad", "fsdp=8", "factored", 2,
                                                                  "--dcn-mesh", "data=2")],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode != 0 and "spans the 1 processes" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "must be in 0..1"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"], ">= 1"),
    (["--distributed", "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"],
     "one or the other"),
])
def test_bad_cluster_flags_are_one_line_errors(flags, message, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), *flags, "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unreachable_coordinator_is_a_bounded_one_line_error(tmp_path):
    flags = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1",
             "--coordinator-timeout", "2", "--output-dir", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 1 and "no coordinator answered" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cluster_parse():
    assert Cluster.parse(None, None, None) is None
    assert Cluster.parse("[::1]:80", 3, 2) == Cluster("[::1]:80", 3, 2)
    with pytest.raises(ValueError, match="port in 1..65535"):
        Cluster.parse("host:0", 2, 0)
