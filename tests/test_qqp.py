"""End to end: experiments/qqp.py on real MiniLM and real QQP rows, kill -9 + resume, restore."""

import csv
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxlora
from flaxlora.interop.export import export
from flaxlora.qqp.data import load_qqp
from flaxlora.training.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "qqp.py"


def flags(data_dir, out, *extra):
    """A short run of one adapter of the default preset (its ensemble: test_members_train_together_...)."""
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", "8", "--save-every", "2",
            "--log-every", "2", "--batch-size", "16", "--max-length", "64", "--buckets", "64",
            "--eval-batch-size", "16", "--seed", "3", "--members", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished_run(qqp_script, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    results = qqp_script.main(flags(data_dir, out))
    return out, results


def test_run_writes_every_output(finished_run):
    out, results = finished_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["held_out_split"] == "test"
    for key in ("accuracy", "f1", "mcc", "loss"):
        assert saved[key] == results[key] == saved["splits"]["test"][key]
    assert 0 < saved["trainable_percent"] < 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert saved["skipped_steps"] == 0 and all(r["skipped"] == 0 for r in train)
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
    assert {r["split"] for r in records if "split" in r} == {"eval", "test"}
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [4, 6, 8]  # keep 3
    assert saved["programs"] <= 2 * 1 + 2  # train and evaluation steps of the one bucket, loading, init
    assert (out / "curves.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())


def test_kill_9_then_resume_is_bitwise_exact(qqp_script, data_dir, finished_run, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *flags(data_dir, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint at step 4 within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        killed_at = ckpt.latest_step()
    assert killed_at < 8, "the run finished before the kill"
    qqp_script.main(flags(data_dir, out, "--resume"))
    with Checkpointer(finished_run[0] / "checkpoints", read_only=True) as a, Checkpointer(out / "checkpoints", read_only=True) as b:
        (ta, _), (tb, _) = a.restore_for_inference(8), b.restore_for_inference(8)
    flat_a, flat_b = flaxlora.pytree.flatten(ta), flaxlora.pytree.flatten(tb)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
    assert json.loads((out / "results.json").read_text())["mcc"] == finished_run[1]["mcc"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:4] == [2, 4, 6, 8]  # no duplicated records after the resume


def test_resume_skips_a_garbled_latest_checkpoint(qqp_script, data_dir, finished_run, tmp_path, capsys):
    out = tmp_path / "garbled"
    shutil.copytree(finished_run[0], out)
    for p in (out / "checkpoints" / "8" / "trainable").rglob("*"):
        if p.is_file() and p.parent.name == "d":  # the OCDBT files holding the arrays
            os.truncate(p, p.stat().st_size // 2)
    qqp_script.main(flags(data_dir, out, "--resume"))
    assert "skipping unreadable checkpoint step 8" in capsys.readouterr().err  # the run's log
    assert (out / "checkpoints.unreadable" / "8").is_dir()
    with Checkpointer(finished_run[0] / "checkpoints", read_only=True) as a, Checkpointer(out / "checkpoints", read_only=True) as b:
        (ta, _), (tb, _) = a.restore_for_inference(8), b.restore_for_inference(8)
    flat_a, flat_b = flaxlora.pytree.flatten(ta), flaxlora.pytree.flatten(tb)
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:4] == [2, 4, 6, 8]  # the records after step 6 were rewritten, not duplicated


def test_an_absurd_learning_rate_stops_with_one_line_and_finite_weights(qqp_script, data_dir, tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(SystemExit) as err:
        qqp_script.main(flags(data_dir, out, "--learning-rate", "1e6", "--max-steps", "30",
                              "--max-skipped-steps", "3"))
    message = str(err.value)
    assert "training diverged" in message and "--max-skipped-steps 3" in message and "\n" not in message
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in records) >= 3 and records[-1]["step"] < 30
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == records[-1]["step"]  # the last finite state, saved at the stop
        for step in ckpt.all_steps():
            trainable, _ = ckpt.restore_for_inference(step)
            assert all(np.isfinite(x).all() for x in flaxlora.pytree.flatten(trainable).values()), step


def test_a_glue_folder_full_of_malformed_rows_trains(qqp_script, data_dir, tmp_path):
    """GLUE layout (train.tsv, dev.tsv) where about a third of the rows are broken in every way the
    loader counts; the run trains on the rest and reports each reason."""
    lines = (data_dir / "rows.tsv").read_bytes().splitlines()
    header, rows = lines[0], lines[1:241]
    breakers = [
        lambda r: r.replace(b"?", b"\xff?", 1),  # not UTF-8
        lambda r: r + b"\textra",  # a column too many
        lambda r: r.rsplit(b"\t", 1)[0],  # a column too few
        lambda r: r.rsplit(b"\t", 1)[0] + b"\t2",  # label outside {0, 1}
        lambda r: b"\t".join(r.split(b"\t")[:3] + [b"   ", *r.split(b"\t")[4:]]),  # blank question1
    ]
    broken = [breakers[i % 5](r) if i % 3 == 0 else r for i, r in enumerate(rows)]
    data = tmp_path / "glue"
    data.mkdir()
    (data / "train.tsv").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([header, *broken[:200]]) + b"\r\n")
    (data / "dev.tsv").write_bytes(b"\n".join([header, *broken[200:]]) + b"\n")
    (data / "readme.csv").write_text("note\nnot a QQP file\n")
    out = tmp_path / "out"
    results = qqp_script.main(["--data-dir", str(data), "--output-dir", str(out), "--max-steps", "2",
                              "--batch-size", "16", "--max-length", "64", "--buckets", "64",
                              "--eval-batch-size", "16", "--save-every", "0", "--quiet"])
    report = results["data_report"]
    assert report["rows_read"] == 241 and sum(report["malformed"].values()) == 80 + 1
    assert report["notes"] == ["readme.csv: ignored (no question1/question2 columns in header ('note',))"]
    assert {k for k, v in report["malformed"].items() if v} == {
        "invalid_utf8", "wrong_column_count", "bad_label", "empty_question", "no_question_columns"}
    assert results["examples"] == {"train": 200 - 67, "validation": 40 - 13}
    assert np.isfinite(results["loss"]) and results["held_out_split"] == "validation"


def test_restored_predictor_reproduces_the_reported_metrics(data_dir, finished_run):
    out, results = finished_run
    predictor = flaxlora.restore(out)
    test = load_qqp(data_dir)["test"]
    predicted = predictor.predict(test.question1, test.question2)
    assert np.mean(predicted == test.labels) == pytest.approx(results["accuracy"], abs=1e-6)
    proba = predictor.predict_proba(test.question1[:5], test.question2[:5])
    assert proba.shape == (5,) and np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_array_equal(proba > 0.5, predicted[:5] == 1)
    assert predictor.logits(["What is AI?"], ["What is artificial intelligence?"]).shape == (1, 2)
    with pytest.raises(ValueError, match="2 first questions but 1 second"):
        predictor.predict(["a", "b"], ["c"])


def test_ensemble_averages_the_runs_probabilities_on_one_base(qqp_script, data_dir, finished_run, tmp_path):
    first, _ = finished_run
    second = tmp_path / "second"
    qqp_script.main(flags(data_dir, second, "--seed", "4"))
    test = load_qqp(data_dir)["test"]
    q1, q2 = test.question1[:24], test.question2[:24]
    singles = [flaxlora.restore(run).predict_proba(q1, q2) for run in (first, second)]
    assert np.abs(singles[0] - singles[1]).max() > 1e-3  # two different adapters
    ensemble = flaxlora.restore_ensemble([first, second])
    np.testing.assert_allclose(ensemble.predict_proba(q1, q2), (singles[0] + singles[1]) / 2, atol=2e-6)
    frozen, adapters = ensemble.params
    assert all(x.shape[0] == 2 for x in jax.tree.leaves(adapters)) and "lora" not in str(jax.tree.structure(frozen))
    with pytest.raises(ValueError, match="at least two runs"):
        flaxlora.restore_ensemble([first])
    other = tmp_path / "other"
    shutil.copytree(first, other)
    _edit_meta(other, lambda m: {**m, "run": {**m["run"], "lora": {**m["run"]["lora"], "alpha": 4.0}}})
    with pytest.raises(ValueError, match="differs from .* an ensemble shares one base"):
        flaxlora.restore_ensemble([first, other])


def test_members_train_together_in_one_job_as_their_single_runs(qqp_script, data_dir, finished_run, tmp_path):
    """--members 3 --seed 1: members seeded 3, 4, 5, trained in one step on member 0's batch order, so
    member 0 is the single run seeded 3 (up to the vmapped step's rounding)."""
    out = tmp_path / "ensemble"
    results = qqp_script.main(flags(data_dir, out, "--members", "3", "--seed", "1"))
    single_dir, single = finished_run  # seed 3
    members = [out / "members" / str(i) for i in range(3)]
    trained = []
    for folder in (single_dir, *members):
        with Checkpointer(folder / "checkpoints", read_only=True) as ckpt:
            trained.append(flaxlora.pytree.flatten(ckpt.restore_for_inference(8)[0]))
    for key, leaf in trained[0].items():  # (AdamW makes rounding noise in near-zero gradients, e.g. key biases', visible)
        np.testing.assert_allclose(trained[1][key], leaf, rtol=1e-3, atol=1e-2 * np.abs(leaf).max(), err_msg=key)
        assert not np.allclose(trained[2][key], leaf) or key.endswith("bias"), key  # another member, another adapter
    assert [m["seed"] for m in results["members"]] == [3, 4, 5]
    assert results["members"][0]["splits"]["test"]["mcc"] == pytest.approx(single["splits"]["test"]["mcc"], abs=1e-6)
    assert results["steps"] == 8 and results["trainable_params"] == 3 * single["trainable_params"]
    assert results["programs"] <= 2 * 1 + 2  # train and evaluation steps of the one bucket, init, the heads
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for folder, member in zip(members, results["members"]):
        saved = json.loads((folder / "results.json").read_text())
        assert saved["seed"] == member["seed"] and saved["splits"]["test"]["mcc"] == member["splits"]["test"]["mcc"]
        assert [r["step"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if "split" not in r] == [2, 4, 6, 8]

    test = load_qqp(data_dir)["test"]
    ensemble = flaxlora.restore(out)  # the ensemble run's folder restores the ensemble
    alone = [flaxlora.restore(folder) for folder in members]
    proba = ensemble.predict_proba(test.question1, test.question2)
    np.testing.assert_allclose(proba, np.mean([m.predict_proba(test.question1, test.question2) for m in alone], axis=0),
                               atol=2e-6)
    assert results["splits"]["test"]["accuracy"] == pytest.approx(np.mean((proba >= 0.5) == test.labels), abs=1e-6)
    for same in (flaxlora.restore_ensemble([out]), flaxlora.restore(out / "checkpoints")):  # as a single run's
        np.testing.assert_array_equal(same.predict_proba(test.question1, test.question2), proba)

    with pytest.raises(SystemExit) as err:  # saved members: nothing is overwritten without --resume
        qqp_script.main(flags(data_dir, out, "--members", "3", "--seed", "1"))
    assert "already holds checkpoints: pass --resume" in str(err.value)
    with pytest.raises(SystemExit) as err:
        qqp_script.main(flags(data_dir, out, "--members", "3", "--seed", "1", "--resume", "--rank", "2"))
    assert "different run configuration" in str(err.value)
    (out / "results.json").unlink()
    with pytest.raises(ValueError, match="an ensemble run that has not finished"):
        flaxlora.restore(out)
    for folder in members:  # interrupted after step 6: --resume trains the last steps of all members
        shutil.rmtree(folder / "checkpoints" / "8")
    again = qqp_script.main(flags(data_dir, out, "--members", "3", "--seed", "1", "--resume"))
    assert again["splits"] == results["splits"]
    shutil.rmtree(members[1] / "checkpoints" / "8")  # members saved at different steps: refused, one line
    with pytest.raises(SystemExit) as err:
        qqp_script.main(flags(data_dir, out, "--members", "3", "--seed", "1", "--resume"))
    assert "saved at different steps (member 0: 8, member 1: 6, member 2: 8)" in str(err.value)
    with pytest.raises(ValueError, match="an ensemble of 3 adapters.* export each member"):
        export(out, tmp_path / "export", "peft")


def _edit_meta(run_dir, edit):
    for meta in (run_dir / "checkpoints").glob("*/meta/metadata"):
        meta.write_text(json.dumps(edit(json.loads(meta.read_text()))))


def test_restore_and_export_rebuild_the_recorded_base(qqp_script, data_dir, finished_run, tmp_path):
    out, results = finished_run
    from flaxlora.loading import base_provenance

    assert results["base_model"]["sha256"] == base_provenance("minilm-l6")["sha256"]
    assert results["base_model"]["source"] == "minilm-l6" and "model.safetensors" in results["base_model"]["files"]
    bf16 = tmp_path / "bf16"
    shutil.copytree(out, bf16)
    _edit_meta(bf16, lambda m: {**m, "run": {**m["run"], "dtype": "bfloat16"}})
    assert flaxlora.restore(bf16).model.dtype == jnp.bfloat16  # the run's compute dtype
    other = tmp_path / "other-base"
    shutil.copytree(out, other)
    _edit_meta(other, lambda m: {**m, "base": {**m["base"], "sha256": "0" * 64}})
    with pytest.raises(ValueError, match="adapters are only valid on the base they were trained on"):
        flaxlora.restore(other)
    cli = subprocess.run([sys.executable, "-m", "flaxlora.export", "--checkpoint", str(other), "--format", "peft",
                          "--out", str(tmp_path / "adapter")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode != 0 and "has sha256" in cli.stderr and "Traceback" not in cli.stderr
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(SystemExit, match="has sha256"):
        qqp_script.main(flags(data_dir, other, "--resume"))


def test_predict_cli(finished_run, tmp_path):
    out, _ = finished_run
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("id\tquestion1\tquestion2\nx1\tHow do I cook rice?\tHow should I cook rice?\n"
                   "x2\tWhat is AI?\tWho won the 1998 World Cup?\n", encoding="utf-8")
    run = lambda *a: subprocess.run([sys.executable, "-m", "flaxlora.predict", "--checkpoint", str(out), *a],
                                    capture_output=True, text=True, timeout=300, cwd=ROOT)
    single = run("--q1", "How do I cook rice?", "--q2", "How should I cook rice?")
    assert single.returncode == 0, single.stderr[-2000:]
    # Nothing but the result: no orbax/absl warnings, no progress bars.
    assert single.stderr == "" and re.fullmatch(r"id\tis_duplicate\tp_duplicate\n0\t[01]\t[01]\.\d{6}\n", single.stdout)
    batch = run("--tsv", str(tsv), "--out", str(tmp_path / "pred.tsv"))
    assert batch.returncode == 0, batch.stderr[-2000:]
    assert (batch.stdout, batch.stderr) == ("", "")
    rows = list(csv.reader((tmp_path / "pred.tsv").open(), delimiter="\t"))
    assert rows[0] == ["id", "is_duplicate", "p_duplicate"] and [r[0] for r in rows[1:]] == ["x1", "x2"]
    assert single.stdout.splitlines()[1].split("\t")[2] == rows[1][2]  # same pair, same probability
    missing = run("--checkpoint", str(tmp_path / "nothing"), "--q1", "a", "--q2", "b")
    assert missing.returncode != 0 and "no run or checkpoint folder" in missing.stderr


def test_bad_flags_and_existing_runs_get_one_line_errors(qqp_script, data_dir, finished_run, tmp_path):
    script = qqp_script
    with pytest.raises(SystemExit) as err:
        script.main(["--bogus"])
    assert "unrecognized arguments: --bogus (see --help)" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as err:
        script.main(["--rank", "0", "--quiet"])
    assert "rank must be an integer >= 1" in str(err.value)
    with pytest.raises(SystemExit) as err:
        script.main(["--preset", "full", "--dora", "--lora-dropout", "0.1"])
    assert "--preset full has no adapters for --dora, --lora-dropout to change" in str(err.value)
    out, _ = finished_run
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    before_files = [p.name for p in out.iterdir()]
    with pytest.raises(SystemExit) as err:
        script.main(flags(data_dir, out))  # same output dir without --resume
    assert "pass --resume" in str(err.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    with pytest.raises(SystemExit) as err:
        script.main(flags(data_dir, out, "--resume", "--rank", "2"))
    assert "different run configuration" in str(err.value) and "lora" in str(err.value)
    for extra, message in [
        (("--max-steps", "6"), "--max-steps gives 6 steps, fewer than the 8 already trained"),
        (("--max-steps", "10"), "--max-steps changes the learning-rate schedule (8 steps saved, 10 now): "
                                "resume with --max-steps 8"),
        (("--mesh", "data=2"), "needs 2 devices, 1 available"),
        (("--mesh", "data=two"), "expected 'axis=size"),
        (("--max-length", "600", "--buckets", "600"), "--max-length 600 exceeds the 512 positions of minilm-l6"),
        (("--eval-batch-size", "0"), "eval_batch_size must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as err:
            script.main(flags(data_dir, out, "--resume", *extra))
        assert message in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == sorted(before_files)  # nothing written
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    results = script.main(flags(data_dir, copy, "--resume", "--eval-batch-size", "8", "--epochs", "5"))  # allowed
    assert results["steps"] == 8 and results["run"]["eval_batch_size"] == 8


def test_importance_rank_allocation_run_restores_and_resumes(qqp_script, data_dir, tmp_path):
    out = tmp_path / "allocated"
    script = qqp_script
    budget = ["--rank-budget", "40", "--targets", r"(query|key|value)/kernel$"]
    script.main(flags(data_dir, out, *budget, "--max-steps", "4"))
    shutil.rmtree(out / "checkpoints" / "4")  # as if stopped after step 2
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        trainable, meta = ckpt.restore_for_inference()
    ranks = {p: a.shape[-1] for p, a in flaxlora.pytree.flatten(trainable["lora"]).items() if p.endswith("/a")}
    assert len(ranks) == 18 and sum(ranks.values()) == 40
    assert len(set(ranks.values())) > 1, "the allocation gave every target the same rank"
    assert flaxlora.LoraConfig(**meta["run"]["lora"]).rank_for(next(iter(ranks))[: -len("/a")]) == next(iter(ranks.values()))
    flaxlora.restore(out).predict(["What is AI?"], ["What is artificial intelligence?"])
    script.main(flags(data_dir, out, *budget, "--max-steps", "4", "--resume"))  # keeps the saved ranks
    assert json.loads((out / "results.json").read_text())["steps"] == 4


def test_bfloat16_frozen_weights_train_and_restore(qqp_script, data_dir, tmp_path):
    """--param-dtype bfloat16 stores the frozen base in bf16 (LoRA and optimizer in fp32); restore
    merges the adapter into that same rounded base in fp32 and reproduces the reported metrics."""
    out = tmp_path / "bf16"
    results = qqp_script.main(flags(data_dir, out, "--param-dtype", "bfloat16", "--max-steps", "4", "--eval-every", "0"))
    assert results["run"]["param_dtype"] == "bfloat16" and np.isfinite(results["loss"])
    test = load_qqp(data_dir)["test"]
    predicted = flaxlora.restore(out).predict(test.question1, test.question2)
    assert np.mean(predicted == test.labels) == pytest.approx(results["accuracy"], abs=1.5 / len(test))


def test_a_second_run_with_the_cache_warm_compiles_nothing(qqp_script, data_dir, tmp_path):
    from flaxlora.training.compile import use_compilation_cache

    cache = tmp_path / "jax-cache"
    try:
        first, second = (qqp_script.main(flags(data_dir, tmp_path / name, "--max-steps", "2", "--eval-every", "0",
                                               "--compilation-cache", str(cache)))
                         for name in ("first", "second"))
    finally:
        use_compilation_cache(None)
    assert first["compiles"] == first["programs"] > 0 and first["compiles_from_cache"] == 0
    assert second["compiles"] == 0 and second["compiles_from_cache"] == second["programs"] == first["programs"]
    assert any(cache.iterdir()) and first["compile_seconds"] > 0


def test_the_steady_loop_reads_nothing_from_the_device(qqp_script, data_dir, tmp_path, monkeypatch):
    """The loop runs under jax.transfer_guard_device_to_host(STEADY_LOOP_TRANSFERS) and allows reads
    only at its sync points. On a CPU the guard sees no transfer (device memory is host memory), so
    here every read of an array's value is failed instead while the steady guard is on."""
    import contextlib
    import threading

    from jax._src import array as jax_array

    from flaxlora.qqp import run as run_module

    steady = threading.local()
    value = jax_array.ArrayImpl._value

    def guarded_value(self):
        if getattr(steady, "on", False):
            raise AssertionError("a device value was read in the steady training loop")
        return value.fget(self)

    @contextlib.contextmanager
    def guard(level):
        before, steady.on = getattr(steady, "on", False), level != "allow"
        try:
            yield
        finally:
            steady.on = before

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(guarded_value))
    monkeypatch.setattr(jax, "transfer_guard_device_to_host", guard)
    monkeypatch.setattr(run_module, "STEADY_LOOP_TRANSFERS", "disallow_explicit")
    with guard("disallow_explicit"), pytest.raises(AssertionError, match="steady training loop"):
        bool(jnp.ones(()))  # the detector catches what SkipGuard did each step: read a flag
    results = qqp_script.main(flags(data_dir, tmp_path / "out", "--max-steps", "12", "--log-every", "5",
                                    "--eval-every", "6", "--save-every", "6"))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == [5, 10, 12]
    assert [r["step"] for r in records if r.get("split") == "eval"] == [6, 12]
    schedule = flaxlora.training.learning_rate_schedule(results["run"]["learning_rate"], 12, 1)  # 6% warmup
    assert [r["lr"] for r in records if "split" not in r] == pytest.approx([float(schedule(s - 1)) for s in (5, 10, 12)])
    assert results["steps"] == 12
