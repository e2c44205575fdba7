"""Run outputs at a URL (gs://...) go through etils.epath, as orbax's checkpoints do."""

import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from flaxlora.paths import as_path, is_url
from flaxlora.qqp.reporting import RunLog, plot_curves
from flaxlora.training.checkpoint import Checkpointer, checkpoint_dir


def test_local_paths_become_absolute_and_urls_stay_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert as_path("runs/x") == epath.Path(tmp_path / "runs" / "x")
    assert os.fspath(as_path("gs://bucket/runs/x")) == "gs://bucket/runs/x"
    assert is_url("gs://bucket/x") and is_url("s3://b/x") and not is_url("runs/gs:x")


def test_metrics_curves_and_checkpoint_folder_at_a_url(tmp_path, monkeypatch):
    """With every epath backend mocked by the local one (no network), gs://bucket/run lands in the
    local folder gs:/bucket/run: metrics.jsonl is rewritten whole (a bucket object cannot be
    appended to), the PNG is written through epath, a resume keeps the records up to its step,
    and a missing checkpoint folder is named by its URL."""
    monkeypatch.chdir(tmp_path)

    def no_append(open_, path, mode):
        if "a" in mode:
            pytest.fail(f"appended to {path}")
        return open_(path, mode)

    with epath_testing.mock_epath(open=no_append):
        out = as_path("gs://bucket/run")
        out.mkdir(parents=True)
        log = RunLog(out, resume_step=None)
        for step in (10, 20, 30):
            log.write({"step": step, "loss": 1.0 / step})
        log.write({"step": 30, "split": "eval", "loss": 0.1, "accuracy": 0.9, "mcc": 0.8})
        log.close()
        plot_curves(log.records, out / "curves.png")
        resumed = RunLog(out, resume_step=20)
        resumed.close()
        with pytest.raises(FileNotFoundError, match="no checkpoint directory at gs://bucket/run/checkpoints"):
            Checkpointer(out / "checkpoints", read_only=True)
        with pytest.raises(FileNotFoundError, match="no run or checkpoint folder at gs://bucket/nothing"):
            checkpoint_dir("gs://bucket/nothing")
    local = tmp_path / "gs:" / "bucket" / "run"
    lines = (local / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]
    assert (local / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
