"""experiments/default_runs.py: variants, resumable runs, the mean ± std table of what finished."""

import importlib.util
import json
import pathlib
import sys

import pytest
import qqp_runs  # experiments/ (on sys.path: conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_runs():
    spec = importlib.util.spec_from_file_location("default_runs", ROOT / "experiments" / "default_runs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_results(mcc):
    split = {"accuracy": 0.8, "f1": 0.75, "mcc": mcc}
    return {"splits": {"test": split, "validation": {**split, "mcc": mcc + 0.01}}, "trainable_percent": 1.6,
            "steps": 960, "train_seconds": 900.0, "wall_seconds": 1000.0, "peak_rss_MiB": 4000.0}


def test_runs_what_is_missing_and_tables_the_seeds_that_finished(default_runs, tmp_path, monkeypatch):
    assert default_runs.variant_flags("lora") == ("lora", ["--preset", "lora"])
    assert default_runs.variant_flags("nf4=--quantize nf4") == ("nf4", ["--quantize", "nf4"])
    with pytest.raises(SystemExit, match="neither a preset"):
        default_runs.variant_flags("nf4")
    commands = []

    def fake_run(command, check):
        commands.append(command)
        out = pathlib.Path(command[command.index("--output-dir") + 1])
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(fake_results(0.6 + 0.01 * int(command[command.index("--seed") + 1]))))

    monkeypatch.setattr(qqp_runs.subprocess, "run", fake_run)
    (tmp_path / "enhanced-s0").mkdir()
    (tmp_path / "enhanced-s0" / "results.json").write_text(json.dumps(fake_results(0.6)))  # already done
    result = default_runs.main(["--variants", "enhanced", "nf4=--quantize nf4", "--seeds", "0", "1", "2",
                                "--output-dir", str(tmp_path)])
    assert len(commands) == 5 and all("--quiet" in c for c in commands)
    assert [c[c.index("--seed") + 1] for c in commands if "--quantize" in c] == ["0", "1", "2"]
    enhanced = result["runs"]["enhanced"]
    assert enhanced["test_mcc"]["mean"] == pytest.approx(0.61) and enhanced["test_mcc"]["std"] == pytest.approx(0.01)
    assert enhanced["validation_mcc"]["mean"] == pytest.approx(0.62) and enhanced["seeds"] == [0, 1, 2]
    assert result["runs"]["nf4"]["peak_rss_MiB"] == 4000.0
    (tmp_path / "nf4-s2" / "results.json").unlink()
    older = fake_results(0.6)  # a run from before results.json recorded the peak RSS
    del older["peak_rss_MiB"]
    (tmp_path / "nf4-s0" / "results.json").write_text(json.dumps(older))
    partial = default_runs.main(["--variants", "enhanced", "nf4=--quantize nf4", "--output-dir", str(tmp_path),
                                 "--table-only"])
    assert partial["runs"]["nf4"]["seeds"] == [0, 1] and len(commands) == 5
    assert partial["runs"]["nf4"]["peak_rss_MiB"] == 4000.0  # the peak of the runs that recorded one
    assert "| nf4 (`--quantize nf4`) | 0, 1 | 1.60% | 960 |" in (tmp_path / "table.md").read_text()
    assert "| 900 ± 0 | 1000 ± 0 | 4000 |" in (tmp_path / "table.md").read_text()  # train s, wall s, peak RSS
