"""experiments/sweep.py: fixed random draws that are valid qqp.py runs; choice on validation only."""

import importlib.util
import json
import pathlib
import sys

import pytest

from flaxlora.qqp.config import QV_TARGETS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "experiments" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# MiniLM's figures (sweep.backbone("minilm-l6")): 37 kernels adapted by the preset, 12 query/value.
MINILM = dict(params=22_713_986, extras=31_874, fans={"all": (768,) * 25 + (1920,) * 12, "qv": (768,) * 12})


def test_trials_are_fixed_draws_under_the_cap_that_qqp_accepts(sweep, qqp_script):
    model = sweep.Backbone(**MINILM)
    assert round(model.trainable_percent({"targets": "all", "rank": 8, "rank-budget": None}), 2) == 1.60  # ENHANCED_LORA
    under_cap = lambda t: model.trainable_percent(t) <= 2.0  # noqa: E731
    counts = {"all": 37, "qv": 12}
    for family in sweep.SPACES:
        allowed = under_cap if family in sweep.ADAPTED else (lambda t: True)
        drawn = [sweep.draw_trial(family, i, 0, allowed) for i in range(24)]
        assert drawn == [sweep.draw_trial(family, i, 0, allowed) for i in range(24)]  # resumable
        assert drawn != [sweep.draw_trial(family, i, 1, allowed) for i in range(24)]
        assert len({d["learning-rate"] for d in drawn}) > 12
        for d in drawn:
            run = qqp_script.run_config(qqp_script.parser().parse_args(sweep.trial_flags(family, d, counts)))
            assert (run.learning_rate, run.epochs, run.warmup_ratio) == (d["learning-rate"], d["epochs"], d["warmup-ratio"])
            low, high = (1e-4, 2e-3) if family == "enhanced" else (1e-5, 2e-4)
            assert low * 0.999 <= run.learning_rate <= high * 1.001
            if family == "full":
                assert run.lora.targets is None and run.lora.trainable == ".*"
                continue
            assert (run.lora.rank, run.lora.alpha, run.lora.use_dora, run.lora.dropout, run.loraplus_ratio) == (
                d["rank"], d["alpha"], d["dora"], d["lora-dropout"], d["loraplus-ratio"])
            assert run.lora.scaling == "rslora" and run.members == 1  # the preset's scaling; one adapter
            assert (run.lora.targets == QV_TARGETS) == (d["targets"] == "qv")
            budget = d["rank-budget"]
            assert run.rank_budget == (None if budget is None else round(budget * d["rank"] * counts[d["targets"]]))
            assert model.trainable_percent(d) <= 2.0
        if family == "enhanced":
            assert {d["dora"] for d in drawn} == {False, True} and {d["targets"] for d in drawn} == {"all", "qv"}
            assert {d["rank"] for d in drawn} == {8, 16, 32, 64} and None in {d["rank-budget"] for d in drawn}


def test_finalists_and_winner_are_chosen_on_validation(sweep, tmp_path, monkeypatch):
    """Validation MCC rises with the learning rate, test MCC falls with it: the choice follows
    validation; a LoRA trial reporting more than the trainable cap is never chosen; finalists
    are rerun with the other seeds; the winner has the best mean."""
    calls = []

    def fake_run(flags, seed, out):
        calls.append((tuple(flags), seed))
        lr = float(flags[flags.index("--learning-rate") + 1])
        val = lr * 100 + (0.001 * seed if "full" in flags else -0.002 * seed)
        share = 100.0 if "full" in flags else 2.5 if lr == top_lora_lr else 1.5
        return {"splits": {"validation": {"mcc": val}, "test": {"mcc": -lr, "accuracy": 0.5, "f1": 0.5}},
                "train_seconds": 1.0, "trainable_percent": share}

    model = sweep.Backbone(**MINILM)
    monkeypatch.setattr(sweep, "run_qqp", fake_run)
    monkeypatch.setattr(sweep, "backbone", lambda name: model)
    top_lora_lr = max(sweep.draw_trial("enhanced", i, 0, lambda t: model.trainable_percent(t) <= 2.0)["learning-rate"]
                      for i in range(5))
    result = sweep.main(["--output-dir", str(tmp_path), "--trials", "5", "--finalists", "2", "--seeds", "0", "1", "2"])
    for family, r in result["families"].items():
        eligible = [t for t in r["trials"] if family == "full" or t["figures"]["trainable_percent"] <= 2.0]
        assert len(eligible) == 5 - (family == "enhanced")
        by_val = sorted(eligible, key=lambda t: -t["figures"]["validation_mcc"])
        assert [f["trial"] for f in r["finalists"]] == [t["name"] for t in by_val[:2]]
        assert r["winner"] == max(r["finalists"], key=lambda f: f["validation_mcc"]["mean"])["trial"]
        assert r["winner"] == by_val[0]["name"]
        best = r["finalists"][0]
        assert best["seeds"] == [0, 1, 2] and best["validation_mcc"]["std"] > 0
        reruns = [(f, s) for f, s in calls if s > 0 and list(f[:len(best["flags"])]) == best["flags"]]
        assert sorted(s for _, s in reruns) == [1, 2]
    assert len(calls) == 2 * (5 + 2 * 2)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["families"]["full"]["winner"] == result["families"]["full"]["winner"]
    assert "**(winner)**" in (tmp_path / "sweep.md").read_text() and (tmp_path / "sweep.png").stat().st_size > 1000
