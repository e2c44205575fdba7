"""experiments/ablation.py end to end on 300 real QQP rows: runs, resumes, aggregates."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ablation_table(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = (ROOT / "flaxlora" / "qqp" / "qqp_sample" / "glue_train_sample_a.tsv").read_text().splitlines()[:301]
    (data / "rows.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments" / "ablation.py"), "--data-dir", str(data), "--arms", "lora", "head",
           "--seeds", "0", "1", "--max-steps", "2", "--batch-size", "8", "--max-length", "64", "--buckets", "64",
           "--eval-examples", "12", "--output-dir", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    assert list(table["arms"]) == ["lora", "head"] and set(table["baselines"]) == {"majority", "tfidf_logreg"}
    lora, head = table["arms"]["lora"], table["arms"]["head"]
    runs = [json.loads((out / "lora" / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert lora["test_mcc"]["mean"] == sum(r["splits"]["test"]["mcc"] for r in runs) / 2
    assert lora["trainable_params"] < head["trainable_params"]  # the pooler (384 x 384) outweighs r=8 q,v
    assert lora["steps"] == 2 and lora["peak_rss_MiB"] > 100
    assert runs[0]["examples"]["validation"] == runs[0]["examples"]["test"] == 12  # --eval-examples
    assert runs[0]["examples"]["train"] > 200
    assert table["command"].startswith("python experiments/ablation.py --data-dir")
    assert "| lora: plain LoRA" in (out / "table.md").read_text() and (out / "mcc.png").stat().st_size > 1000
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # every run is done: nothing reruns
    assert again.returncode == 0 and "seed 0" not in again.stdout
