"""The committed results agree with themselves, with the presets and with the documents that quote them."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

import ablation  # experiments/ (on sys.path: conftest.py)
import buckets
import default_runs
import scaling
import tables
from flaxlora.qqp.config import PRESETS, RunConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
README = ROOT / "README.md"
EVIDENCE = ROOT / "experiments" / "README.md"

ABLATIONS = sorted(RESULTS.glob("ablation-*/table.json"))
RUN_TABLES = sorted(p for p in RESULTS.glob("*/table.json")  # default_runs.py's
                    if p not in ABLATIONS and "runs" in json.loads(p.read_text()))
PRESET_RUNS = RESULTS / "presets"  # links to the runs README's default-run table shows
BENCH_PEER = sorted(p for p in RESULTS.glob("**/*.json") if "peer" in json.loads(p.read_text()))
MEMORY = sorted(RESULTS.glob("memory-*.json"))
ENSEMBLE_RUNS = sorted(p.parent for p in RESULTS.glob("*/*/results.json") if "members" in json.loads(p.read_text()))


def test_some_ablation_table_is_committed():
    assert ABLATIONS, "no experiments/results/ablation-*/table.json"
    assert RUN_TABLES and BENCH_PEER and MEMORY and ENSEMBLE_RUNS


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.parent.name)
def test_ablation_table_is_the_mean_of_its_runs_and_the_evidence_shows_it(path):
    table = json.loads(path.read_text())
    for name, row in table["arms"].items():
        runs = [json.loads((path.parent / name / f"seed{s}" / "results.json").read_text()) for s in row["seeds"]]
        assert len(runs) >= 3, f"{name}: fewer than 3 seeds"
        mccs = [r["splits"]["test"]["mcc"] for r in runs]
        assert row["test_mcc"]["mean"] == pytest.approx(np.mean(mccs), abs=1e-12), name
        assert {r["steps"] for r in runs} == {row["steps"]}, f"{name}: arms must share the step budget"
        assert {r["arm"] for r in runs} == {name}
    assert len({row["steps"] for row in table["arms"].values()}) == 1
    assert_committed_and_shown(path.parent, ablation.markdown(table), EVIDENCE)
    assert table["command"] in EVIDENCE.read_text()


@pytest.mark.parametrize("path", RUN_TABLES, ids=lambda p: p.parent.name)
def test_run_table_is_the_mean_of_its_runs_and_the_evidence_shows_it(path):
    table = json.loads(path.read_text())
    for name, row in table["runs"].items():
        runs = [json.loads((path.parent / f"{name}-s{s}" / "results.json").read_text()) for s in row["seeds"]]
        assert row["test_mcc_per_seed"] == [r["splits"]["test"]["mcc"] for r in runs], name
        assert row["validation_mcc"]["mean"] == pytest.approx(np.mean([r["splits"]["validation"]["mcc"] for r in runs]),
                                                              abs=1e-12), name
        assert {r["steps"] for r in runs} == {row["steps"]}, name
    assert_committed_and_shown(path.parent, default_runs.markdown(table), README, EVIDENCE)


@pytest.mark.parametrize("preset", default_runs.PRESETS)
def test_the_default_run_table_shows_runs_of_the_presets_as_they_ship(preset):
    for seed in (0, 1, 2):
        saved = json.loads((PRESET_RUNS / f"{preset}-s{seed}" / "results.json").read_text())["run"]
        run = RunConfig.from_dict(saved).to_dict()  # fields added since the run: their defaults
        shipped = dataclasses.replace(PRESETS[preset], seed=seed).to_dict()
        changed = {k: (run[k], v) for k, v in shipped.items() if run[k] != v}
        assert not changed, f"presets/{preset}-s{seed} was run with (run, preset now): {changed}"


@pytest.mark.parametrize("folder", ENSEMBLE_RUNS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_an_ensemble_runs_folder_holds_its_members_runs(folder):
    results = json.loads((folder / "results.json").read_text())
    run = RunConfig.from_dict(results["run"])
    assert [m["output_dir"] for m in results["members"]] == [f"members/{i}" for i in range(run.members)]
    for i, member in enumerate(results["members"]):
        saved = json.loads((folder / member["output_dir"] / "results.json").read_text())
        assert RunConfig.from_dict(saved["run"]) == run.member(i), f"{folder.name} member {i}"
        assert member["splits"]["test"]["mcc"] == saved["splits"]["test"]["mcc"]


def test_readme_shows_the_presets_table_as_committed():
    assert_committed_and_shown(PRESET_RUNS, default_runs.markdown(json.loads((PRESET_RUNS / "table.json").read_text())),
                               README)


@pytest.mark.parametrize("path", BENCH_PEER, ids=lambda p: p.name)
def test_a_side_by_side_benchmark_is_consistent(path):
    """ratios are the sides' own figures, and neither side compiled while it was timed."""
    r = json.loads(path.read_text())
    ours, peft, ratios = r, r["peer"], r["ratios"]
    assert ratios["train_throughput"] == pytest.approx(peft["train_step_s"] / ours["train_step_s"])
    assert ratios["peak_rss"] == pytest.approx(ours["peak_rss_mb"] / peft["peak_rss_mb"])
    for side in (ours, peft, r.get("vs", ours)):
        assert side["train_step_s"] == pytest.approx(np.median(side["train_step_s_all"])), path.name
        assert len(side["train_step_s_all"]) == r["config"]["steps"]
    assert ours["compiles_after_warmup"] == r.get("vs", ours)["compiles_after_warmup"] == 0


@pytest.mark.parametrize("path", MEMORY, ids=lambda p: p.name)
def test_a_memory_benchmark_judges_its_target_by_its_figures(path):
    for run in json.loads(path.read_text())["runs"]:
        assert len(run["peak_rss_GiB"]) == run["processes"]
        assert run["within_target"] == (max(run["peak_rss_GiB"]) <= run["target_GiB"])


@pytest.mark.parametrize("path", sorted(tables.TABLES), ids=str)
def test_a_summary_table_is_what_its_results_make(path):
    make, source = tables.TABLES[path]
    assert (RESULTS / path).read_text() == make(source), f"run python experiments/tables.py ({path} is stale)"


def test_the_scaling_and_bucket_tables_are_what_their_json_makes():
    assert (RESULTS / "scaling" / "scaling.md").read_text() == scaling.markdown(
        json.loads((RESULTS / "scaling" / "scaling.json").read_text())["points"])
    replays = json.loads((RESULTS / "buckets" / "buckets.json").read_text())["replays"]
    assert (RESULTS / "buckets" / "buckets.md").read_text().splitlines()[2:] == buckets.table(replays)


def assert_committed_and_shown(folder, markdown, *documents):
    """FOLDER/table.md is ``markdown`` (the table its table.json makes), and one of ``documents`` shows each row."""
    assert (folder / "table.md").read_text() == markdown
    texts = [d.read_text() for d in documents]
    for line in markdown.splitlines()[2:]:
        assert any(line in t for t in texts), f"{'/'.join(d.name for d in documents)} lacks the {folder.name} row {line[:60]!r}"


def test_the_memory_model_table_is_what_the_model_predicts_and_readme_shows_it():
    import memory_model

    folder = RESULTS / "memory-model"
    saved = json.loads((folder / "table.json").read_text())
    rows = memory_model.table(saved["seq_len"], saved["batch"], saved["usable"])
    assert json.loads(json.dumps(rows)) == saved["rows"]
    command = "python experiments/memory_model.py --out experiments/results/memory-model"
    made = {name: memory_model.markdown(rows, saved["seq_len"], saved["batch"], saved["usable"], command, storages)
            for name, storages in (("table.md", tuple(memory_model.STORAGE)), ("readme.md", ("bf16",)))}
    for name, markdown in made.items():
        assert (folder / name).read_text() == markdown, name
    assert made["readme.md"] in README.read_text() and made["table.md"] in EVIDENCE.read_text()
