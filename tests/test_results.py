"""The committed ablation tables agree with their per-run results and with the README."""

import json
import pathlib

import numpy as np
import pytest

import ablation  # experiments/ (on sys.path: conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[1]

TABLES = sorted((ROOT / "experiments" / "results").glob("ablation-*/table.json"))


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
    markdown = ablation.markdown(table)
    assert (path.parent / "table.md").read_text() == markdown
    readme = (ROOT / "README.md").read_text()
    for line in markdown.splitlines()[2:]:
        assert line in readme, f"README lacks the {path.parent.name} row {line[:60]!r}"
    assert table["command"] in readme
