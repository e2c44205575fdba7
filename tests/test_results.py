"""The committed result tables agree with their per-run results, the presets and the README."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

import ablation  # experiments/ (on sys.path: conftest.py)
import default_runs
from flaxlora.qqp.config import PRESETS, RunConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]

TABLES = sorted((ROOT / "experiments" / "results").glob("ablation-*/table.json"))
PRESET_RUNS = ROOT / "experiments" / "results" / "presets"  # links to the runs README's default-run table shows


def test_some_ablation_table_is_committed():
    assert TABLES, "no experiments/results/ablation-*/table.json"


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.parent.name)
def test_table_is_the_mean_of_its_runs_and_matches_markdown_and_readme(path):
    table = json.loads(path.read_text())
    for name, row in table["arms"].items():
        runs = [json.loads((path.parent / name / f"seed{s}" / "results.json").read_text()) for s in row["seeds"]]
        assert len(runs) >= 3, f"{name}: fewer than 3 seeds"
        mccs = [r["splits"]["test"]["mcc"] for r in runs]
        assert row["test_mcc"]["mean"] == pytest.approx(np.mean(mccs), abs=1e-12), name
        assert {r["steps"] for r in runs} == {row["steps"]}, f"{name}: arms must share the step budget"
        assert {r["arm"] for r in runs} == {name}
    assert len({row["steps"] for row in table["arms"].values()}) == 1
    assert_committed_and_in_readme(path.parent, ablation.markdown(table))
    assert table["command"] in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("preset", default_runs.PRESETS)
def test_the_default_run_table_shows_runs_of_the_presets_as_they_ship(preset):
    for seed in (0, 1, 2):
        saved = json.loads((PRESET_RUNS / f"{preset}-s{seed}" / "results.json").read_text())["run"]
        run = RunConfig.from_dict(saved).to_dict()  # fields added since the run: their defaults
        shipped = dataclasses.replace(PRESETS[preset], seed=seed).to_dict()
        changed = {k: (run[k], v) for k, v in shipped.items() if run[k] != v}
        assert not changed, f"presets/{preset}-s{seed} was run with (run, preset now): {changed}"


@pytest.mark.parametrize("preset", [p for p in default_runs.PRESETS if PRESETS[p].members > 1])
def test_an_ensemble_presets_runs_hold_the_presets_members(preset):
    for seed in (0, 1, 2):
        folder = PRESET_RUNS / f"{preset}-s{seed}"
        results = json.loads((folder / "results.json").read_text())
        shipped = dataclasses.replace(PRESETS[preset], seed=seed)
        assert [m["output_dir"] for m in results["members"]] == [f"members/{i}" for i in range(shipped.members)]
        for i, member in enumerate(results["members"]):
            run = json.loads((folder / member["output_dir"] / "results.json").read_text())
            assert RunConfig.from_dict(run["run"]) == shipped.member(i), f"{folder.name} member {i}"
            assert member["splits"]["test"]["mcc"] == run["splits"]["test"]["mcc"]
        assert results["steps"] == shipped.members * run["steps"]


def test_readme_shows_the_presets_table_as_committed():
    assert_committed_and_in_readme(PRESET_RUNS, default_runs.markdown(json.loads((PRESET_RUNS / "table.json").read_text())))


def assert_committed_and_in_readme(folder, markdown):
    """FOLDER/table.md is ``markdown`` (the table its table.json makes), and README shows every row."""
    assert (folder / "table.md").read_text() == markdown
    readme = (ROOT / "README.md").read_text()
    for line in markdown.splitlines()[2:]:
        assert line in readme, f"README lacks the {folder.name} row {line[:60]!r}"
