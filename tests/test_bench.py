"""experiments/bench.py hands each side process the configuration it is to measure."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import bench  # experiments/ (on sys.path: conftest.py)


def test_every_flag_of_our_side_reaches_its_process():
    base = ["--preset", "enhanced", "--rank", "16", "--lora-path", "merged", "--batch", "8", "--seq-len", "64",
            "--param-dtype", "bfloat16", "--peer-device", "cuda", "--memory-account"]
    args = bench.parse([*base, "--vs", "--quantize nf4 --scan-layers --remat block", "--variant", "--remat full"])
    for side in (args, args.vs_args, *args.variant_args):
        argv = bench.side_args(side, "ours", pathlib.Path("batches.npz"))
        parsed = bench.parser().parse_args(argv[2:])
        for name in ("model", "preset", "rank", "lora_path", "quantize", "scan_layers", "remat", "batch", "seq_len", "dtype",
                     "param_dtype", "peer_device", "memory_account", "targets", "warmup", "eval_batch", "eval_batches"):
            assert getattr(parsed, name) == getattr(side, name), name
    assert args.vs_args.quantize == "nf4" and args.vs_args.scan_layers and args.vs_args.remat == "block"
    assert args.variant_args[0].remat == "full" and args.variant_args[0].param_dtype == "bfloat16"
    assert "--memory-account" not in bench.side_args(args, "peft", pathlib.Path("batches.npz"))  # ours only


def test_peft_is_not_asked_to_mirror_a_quantized_base(capsys):
    with pytest.raises(SystemExit):
        bench.parse(["--peer", "peft", "--quantize", "nf4"])
    assert "bitsandbytes" in capsys.readouterr().err
    args = bench.parse(["--peer", "peft", "--variant", "--quantize nf4"])  # as a variant: ours alone
    assert bench.peer_mirrors(args.variant_args[0]) and not bench.peer_mirrors(args)


def test_device_peaks_name_the_accelerators_and_fall_back_to_the_cpu_formula():
    assert bench.peak_flops("NVIDIA H200", "bfloat16") == (989e12, "H200 bfloat16")
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "float32") == (67e12, "H100 float32")
    assert bench.peak_flops("TPU v5 lite", "float32") == (197e12, "TPU v5e bfloat16")  # a TPU has no float32 peak
    assert bench.peak_flops("cpu", "float32")[1] == "cpu formula"


def test_option_lists_match_the_library():  # bench's parent process imports no jax, so it keeps copies
    from flaxlora.models.layers import REMAT_POLICIES
    from flaxlora.qqp.config import PRESETS
    from flaxlora.quant.tree import OPTIONS

    assert bench.REMAT_POLICIES == tuple(REMAT_POLICIES) and bench.QUANTIZE_OPTIONS == tuple(OPTIONS)
    assert bench.LEARNING_RATES == {name: PRESETS[name].learning_rate for name in bench.PRESETS}


def test_measure_ours_turns_keywords_into_bench_options(monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda args: args)
    args = bench.measure_ours(preset="enhanced", seq_len=64, batch=8, rank=None, scan_layers=True, remat=False,
                              eval_batches=0)
    assert (args.preset, args.seq_len, args.batch, args.rank, args.scan_layers, args.remat, args.eval_batches) == \
        ("enhanced", 64, 8, None, True, None, 0)


def test_the_accelerator_memory_check_runs_at_a_tiny_size(tmp_path):
    """experiments/memory_check.sh --tiny: the GPU commands (ours against PEFT, the variants, the
    memory account, the memory model's check) on a tiny random Llama, PEFT on the CPU."""
    root = pathlib.Path(bench.__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "experiments" / "memory_check.sh"), str(tmp_path), "--tiny"],
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["remat"] == "none" and result["peer"]["gradient_checkpointing"] is False
    account = result["memory_account"]
    assert account["by_category"]["frozen"] > 0 and account["peak"] <= account["argument"] + account["temp"] + account["output"]
    bf16, remat, nf4, scan = result["variants"]
    assert bf16["ours"]["param_dtype"] == bf16["peer"]["param_dtype"] == "bfloat16"
    assert remat["ours"]["remat"] == "full" and remat["peer"]["gradient_checkpointing"] is True
    assert remat["ours"]["memory_account"]["by_category"]["activations"] < account["by_category"]["activations"]
    assert nf4["ours"]["quantize"] == "nf4" and "bitsandbytes" in nf4["peer"]["skipped"]
    assert nf4["ours"]["memory_account"]["by_category"]["frozen"] < account["by_category"]["frozen"]
    assert scan["ours"]["scan_layers"] and scan["peer"] == {"shared": "peft"} and "train_throughput" in scan["ratios"]
    assert all(r["peak_flops_of"] == "cpu formula" and r["device_peak_mb"] is None for r in (result, result["peer"]))
    check = json.loads((tmp_path / "memory_model_check.json").read_text())["rows"]
    assert [r["side"] for r in check] == ["main", "--param-dtype bfloat16", "--remat full", "--quantize nf4", "--scan-layers"]
    assert all(r["ratio_xla"] > 0 for r in check)


def test_one_side_at_a_time_measures_each_sides_step_memory(tmp_path):
    """--one-at-a-time (a model that fits once in memory): each side ends before the next loads,
    and reports the resident memory of its own train steps, which the ratios set side by side."""
    import bench_memory

    model = tmp_path / "llama"
    bench_memory.make_model(model, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2)
    result = bench.main(["--model", str(model), "--batch", "2", "--seq-len", "16", "--steps", "1", "--rounds", "1",
                         "--warmup", "1", "--eval-batches", "0", "--peer", "peft", "--one-at-a-time",
                         "--variant=--remat full", "--json", str(tmp_path / "bench.json")])
    sides = [result, result["peer"], result["variants"][0]["ours"], result["variants"][0]["peer"]]
    assert all(0 < side["step_rss_mb"] <= side["peak_rss_mb"] for side in sides)
    assert result["variants"][0]["peer"]["gradient_checkpointing"] is True
    assert result["ratios"]["step_rss"] == pytest.approx(result["step_rss_mb"] / result["peer"]["step_rss_mb"])
