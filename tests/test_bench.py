"""experiments/bench.py hands each side process the configuration it is to measure."""

import pathlib
import shlex

import bench  # experiments/ (on sys.path: conftest.py)


def test_every_flag_of_our_side_reaches_its_process():
    base = ["--preset", "enhanced", "--rank", "16", "--lora-path", "merged", "--batch", "8", "--seq-len", "64"]
    ours = bench.parser().parse_args(base)
    vs = bench.parser().parse_args([*base, *shlex.split("--quantize nf4 --scan-layers --remat block")])  # as main() builds --vs
    for side in (ours, vs):
        argv = bench.side_args(side, "ours", pathlib.Path("batches.npz"))
        parsed = bench.parser().parse_args(argv[2:])
        for name in ("model", "preset", "rank", "lora_path", "quantize", "scan_layers", "remat", "batch", "seq_len", "dtype",
                     "targets", "warmup", "eval_batch", "eval_batches"):
            assert getattr(parsed, name) == getattr(side, name), name
    assert vs.quantize == "nf4" and vs.scan_layers and vs.remat == "block"


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
    assert args.peer is None and args.vs is None  # our side alone
