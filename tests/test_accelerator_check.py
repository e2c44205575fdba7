"""experiments/accelerator_check.py dry-runs on the CPU at tiny sizes: the default run cold, then
warm from the persistent cache with the steady loop under the transfer guard."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_accelerator_check_dry_run(tmp_path):
    out = tmp_path / "check"
    subprocess.run([sys.executable, "experiments/accelerator_check.py", "--tiny", "--steps", "default-cold,default-warm",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    cold, warm = (summary["steps"][s] for s in ("default-cold", "default-warm"))
    assert cold["status"] == warm["status"] == "ok", summary
    cold, warm = cold["figures"], warm["figures"]
    assert cold["compiles"] == cold["programs"] > 0 and cold["compiles_from_cache"] == 0
    assert warm["compiles"] == 0 and warm["compiles_from_cache"] == warm["programs"] == cold["programs"]
    assert cold["steps"] == 6 and warm["steps_per_s"] > 0
    assert "| default-warm | ok |" in (out / "summary.md").read_text()
    result = subprocess.run([sys.executable, "experiments/accelerator_check.py", "--steps", "nope", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown steps ['nope']" in result.stderr
