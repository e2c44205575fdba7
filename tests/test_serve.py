"""Many adapters on one base: mixed batches equal each run's own restore, the HTTP endpoint's
interface, every bad input, a full queue, and SIGTERM. Runs of experiments/qqp.py on a tiny random
BERT (MiniLM's tokenizer)."""

import dataclasses
import http.client
import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_loading import write_folder
from test_models import tiny_bert
from test_qqp import _edit_meta

import flaxlora
from flaxlora.loading import load_pretrained, to_hf
from flaxlora.lora import LoraConfig
from flaxlora.microbatch import Closed, MicroBatcher
from flaxlora.models import init_params, sequence_classifier
from flaxlora.qqp import server
from flaxlora.qqp.data import load_qqp

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random 1-layer BERT classifier (hidden 32) as a Hugging Face folder."""
    config = tiny_bert(num_labels=2, vocab_size=30522, max_position_embeddings=64, num_hidden_layers=1)
    params = init_params(sequence_classifier(config), jax.random.key(7))
    return write_folder(tmp_path_factory.mktemp("tiny-bert"), dataclasses.asdict(config), to_hf(params))


def run_flags(folder, data_dir, out, seed, *extra):
    return ["--model", str(folder), "--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", "3",
            "--batch-size", "8", "--max-length", "64", "--buckets", "32,64", "--eval-examples", "8",
            "--eval-batch-size", "8", "--learning-rate", "5e-2", "--seed", str(seed), "--members", "1", "--quiet",
            *extra]


# Served together: plain LoRA (rank 4 on q, v, the head trained) as an ensemble run of two members
# and as one of them alone, the enhanced preset (rank 2 on every linear layer and the pooler,
# rsLoRA, BitFit extras) and DoRA (rank 2 on q, k): ranks, targets, extras and scaling all differ.
TRAINED = {
    "ensemble": ["--preset", "lora", "--rank", "4", "--members", "2"],
    "enhanced": ["--rank", "2"],
    "dora": ["--preset", "lora", "--dora", "--rank", "2", "--targets", "(query|key)/kernel$"],
}
KINDS = ("lora", "enhanced", "dora", "ensemble")


@pytest.fixture(scope="module")
def runs(qqp_script, tiny_folder, data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    for seed, (name, extra) in enumerate(TRAINED.items()):
        qqp_script.main(run_flags(tiny_folder, data_dir, folder / name, seed, *extra))
    found = {"lora": folder / "ensemble" / "members" / "1", **{name: folder / name for name in TRAINED}}
    return {name: found[name] for name in KINDS}


@pytest.fixture(scope="module")
def many(runs):
    return flaxlora.restore_many(runs, batch_sizes=(2, 8, 32))


@pytest.fixture(scope="module")
def pairs(data_dir):
    test = load_qqp(data_dir)["train"]
    return list(test.question1[:30]), list(test.question2[:30])


@pytest.fixture(scope="module")
def references(runs, pairs):
    """Each run's own restore's logits of every pair."""
    return {name: flaxlora.restore(run).logits(*pairs) for name, run in runs.items()}


def test_a_mixed_batch_equals_each_adapters_own_restore(many, runs, pairs, references):
    names = [list(runs)[i % len(runs)] for i in (np.arange(30) * 7) % 11]  # every adapter, interleaved
    mixed = many.logits(*pairs, adapter=names)
    for name in runs:
        rows = [i for i, n in enumerate(names) if n == name]
        assert rows and np.abs(mixed[rows] - references[name][rows]).max() <= TOLERANCE, name
        np.testing.assert_allclose(many.logits(*pairs, adapter=name), references[name], atol=TOLERANCE, rtol=0)
    order = list(runs)
    for a, b in zip(order, order[1:]):  # the adapters (and their extras) really differ
        assert np.abs(references[a] - references[b]).max() > 1e-3, (a, b)
    probabilities = many.predict_proba(*pairs, adapter=names)
    np.testing.assert_allclose(probabilities, jax.nn.softmax(mixed, axis=-1)[:, 1], atol=1e-6)
    np.testing.assert_array_equal(many.predict(*pairs, adapter=names), mixed.argmax(-1))
    assert many.names == tuple(KINDS) and len(many.members["ensemble"]) == 2


def test_restore_ensemble_is_every_adapter_on_each_row_averaged(runs, pairs, many):
    members = sorted((runs["ensemble"] / "members").iterdir())
    ensemble = flaxlora.restore_ensemble(members).logits(*pairs)
    np.testing.assert_allclose(many.logits(*pairs, adapter="ensemble"), ensemble, atol=TOLERANCE, rtol=0)


def test_bad_adapter_names_get_one_line_errors(many, pairs):
    with pytest.raises(ValueError, match="unknown adapter 'nope': the loaded adapters are lora, enhanced, dora"):
        many.logits(*pairs, adapter="nope")
    with pytest.raises(ValueError, match="30 pairs but 2 adapter names"):
        many.logits(*pairs, adapter=["lora", "dora"])
    with pytest.raises(ValueError, match="1 first questions but 2 second questions"):
        many.logits(["a"], ["b", "c"], adapter="lora")
    with pytest.raises(TypeError, match="pass sequences of questions"):
        many.logits("a", "b", adapter="lora")
    with pytest.raises(ValueError, match="at least one"):
        flaxlora.restore_many({})


def edited(run, tmp_path, name, edit):
    copy = tmp_path / name
    shutil.copytree(run, copy)
    _edit_meta(copy, edit)
    return copy


def with_run(**changes):
    return lambda meta: {**meta, "run": {**meta["run"], **changes}}


def with_lora(**changes):
    return lambda meta: {**meta, "run": {**meta["run"], "lora": {**meta["run"]["lora"], **changes}}}


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "base": {**m["base"], "sha256": "0" * 64}}, "adapters are only valid on the base they were"),
    (with_run(text_to_text=True), r"differs from .* in its model kind"),
    (with_run(quantize="int8"), r"differs from .* in its quantize \('int8' vs None\)"),
    (with_run(param_dtype="bfloat16"), "in its param_dtype"),
    (with_run(max_length=32, buckets=[32]), r"in its max_length \(32 vs 64\)"),
    (with_lora(init="pissa"), "init 'pissa', whose frozen base is its own residual: serve it alone"),
])
def test_runs_that_change_the_base_are_refused_in_one_line(runs, tmp_path, edit, message):
    other = edited(runs["lora"], tmp_path, "other", edit)
    with pytest.raises(ValueError, match=message) as err:
        flaxlora.restore_many({"a": runs["enhanced"], "b": other})
    assert "\n" not in str(err.value)


def test_runs_with_other_buckets_are_served_together(runs, tmp_path, pairs, references):
    one_bucket = edited(runs["lora"], tmp_path, "one-bucket", with_run(buckets=[64]))
    both = flaxlora.restore_many({"a": runs["dora"], "b": one_bucket})
    assert both.buckets == (32, 64)
    np.testing.assert_allclose(both.logits(*pairs, adapter="b"), flaxlora.restore(one_bucket).logits(*pairs),
                               atol=TOLERANCE, rtol=0)


def test_full_fine_tuning_and_bases_seeded_otherwise_are_refused(tiny_folder, runs, tmp_path):
    from random_adapters import random_run  # experiments/: a run's checkpoint without training it

    pretrained = load_pretrained(tiny_folder, num_labels=2)
    full = random_run(pretrained, str(tiny_folder), LoraConfig(targets=None, trainable=".*"), 0, tmp_path / "full",
                      max_length=64)
    with pytest.raises(ValueError, match=r"trains 100% of the base's weights in full \(full fine-tuning\?\)"):
        flaxlora.restore_many({"a": runs["lora"], "full": full})
    config = json.loads((tiny_folder / "config.json").read_text())
    headless = write_folder(tmp_path / "headless", config, {k: v for k, v in load_file(
        tiny_folder / "model.safetensors").items() if k.startswith("bert.")})  # the classifier: seeded at load
    pretrained = load_pretrained(headless, num_labels=2)
    frozen_head = [random_run(pretrained, str(headless), LoraConfig(rank=2), seed, tmp_path / f"s{seed}",
                              max_length=64) for seed in (0, 1)]  # trained without the head: it stays as seeded
    with pytest.raises(ValueError, match="s1 leaves classifier/bias as initialised with its seed 1, not 0"):
        flaxlora.restore_many({"a": frozen_head[0], "b": frozen_head[1]})


def test_an_unfinished_ensemble_run_is_refused(runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["ensemble"], unfinished)
    (unfinished / "results.json").unlink()
    with pytest.raises(ValueError, match="an ensemble run that has not finished"):
        flaxlora.restore_many({"e": unfinished})


def test_micro_batcher_runs_what_arrives_together_in_one_call():
    calls = []
    batcher = MicroBatcher(lambda jobs: calls.append(list(jobs)) or [job * 10 for job in jobs], max_queue=16,
                           max_rows=5, max_wait_s=0.3)
    futures = [batcher.submit(i, rows=2) for i in range(4)]  # 8 rows: at most 5 per call
    assert [f.result(5) for f in futures] == [0, 10, 20, 30]
    assert calls == [[0, 1], [2, 3]]
    failing = MicroBatcher(lambda jobs: 1 / 0, max_queue=1, max_rows=1, max_wait_s=0)
    with pytest.raises(ZeroDivisionError):
        failing.submit("x").result(5)
    assert batcher.submit(7).result(5) == 70  # the worker goes on
    batcher.close(5)
    with pytest.raises(Closed):
        batcher.submit(8)


@pytest.fixture(scope="module")
def live(many):
    """The HTTP server on 127.0.0.1 (a free port), answering from ``many``; a short body timeout."""
    app = server.App(server.Limits(max_pairs=8, max_question_chars=500, max_body_bytes=300_000, timeout_s=1.0))
    app.start(many, max_queue=8, max_batch=32, max_wait_s=0.05)
    httpd = server.Server(("127.0.0.1", 0), app)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield app, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    app.drain(5)


def call(port, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, path, body, headers or {})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


def predict(port, adapter, pairs):
    return call(port, "POST", "/predict", json.dumps({"adapter": adapter, "pairs": pairs}).encode())


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_the_endpoint_batches_requests_for_any_adapters_and_answers_as_restore(live, runs, pairs, references):
    app, port = live
    assert call(port, "GET", "/health") == (200, {"status": "ok", "adapters": list(KINDS)})
    sizes = []
    score = app.batcher._run
    app.batcher._run = lambda jobs: sizes.append(len(jobs)) or score(jobs)
    requests = [(name, list(range(i % 4, i % 4 + 1 + i % 3))) for i, name in enumerate(list(runs) * 2)]
    answers = [None] * len(requests)

    def send(k):
        name, rows = requests[k]
        answers[k] = predict(port, name, [[pairs[0][r], pairs[1][r]] for r in rows])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    app.batcher._run = score
    for (name, rows), (status, answer) in zip(requests, answers):
        assert status == 200 and answer["adapter"] == name
        expected = softmax(references[name][rows].astype(np.float64))
        assert np.abs(np.asarray(answer["probabilities"]) - expected).max() <= TOLERANCE
        assert answer["labels"] == expected.argmax(-1).tolist() and set(answer) == {"adapter", "probabilities", "labels"}
    assert sum(sizes) == len(requests) and max(sizes) > 1  # requests shared forwards


GOOD = json.dumps({"adapter": "lora", "pairs": [["How do I learn Python?", "What is the best way to learn Python?"]]})
BAD_BODIES = [
    (json.dumps({"adapter": "nope", "pairs": [["a", "b"]]}), 404, "unknown adapter 'nope': the loaded adapters are"),
    ('{"adapter": "lora", "pairs": [["a", "b"]', 400, "malformed JSON: Expecting ',' delimiter"),
    ("[1, 2]", 400, "the body is a JSON list, not an object"),
    (json.dumps({"adapter": 3, "pairs": [["a", "b"]]}), 400, '"adapter" must be a string'),
    (json.dumps({"adapter": "lora", "pairs": {"q1": "a"}}), 400, '"pairs" must be a list'),
    (json.dumps({"adapter": "lora", "pairs": [["a", "b", "c"]]}), 400, r"pairs\[0\] must be \[question1, question2\]"),
    (json.dumps({"adapter": "lora", "pairs": [["a", 5]]}), 400, r"pairs\[0\] must be .* two strings"),
    (json.dumps({"adapter": "lora", "pairs": []}), 400, '"pairs" is empty'),
    (json.dumps({"adapter": "lora"}), 400, "a field is missing"),
    (json.dumps({"adapter": "lora", "pairs": [["a", "b"]], "extra": 1}), 400, "unknown field 'extra'"),
    (json.dumps({"adapter": "lora", "pairs": [["a", "b"]] * 9}), 413, r"9 pairs: at most 8 per request \(--max-pairs\)"),
    (json.dumps({"adapter": "lora", "pairs": [["q" * 100_000, "b"]]}), 413,
     r"pairs\[0\]\[0\] has 100000 characters: at most 500 \(--max-question-chars\)"),
    ('{"adapter": "lora", "pairs": [["\\ud800", "b"]]}', 400, r"pairs\[0\]\[0\] holds an unpaired surrogate"),
    ("[" * 200_000 + "]" * 200_000, 413, "a body of 400000 bytes: at most 300000"),
    ("[" * 9_000 + "]" * 9_000, 400, "unreadable JSON|malformed JSON"),
    ('{"adapter": "lora", "pairs": [["a", "b"]], "n": ' + "9" * 5000 + "}", 400, "unreadable JSON"),
    (b'{"adapter": "lora", "pairs": [["caf\xe9", "b"]]}', 400, r"the body is not UTF-8 \(byte 0xe9 at 35\)"),
]


@pytest.mark.parametrize("body, status, message", BAD_BODIES, ids=[m[:24] for _, _, m in BAD_BODIES])
def test_every_bad_body_gets_a_4xx_and_the_next_request_is_served(live, body, status, message):
    _, port = live
    got, answer = call(port, "POST", "/predict", body.encode() if isinstance(body, str) else body)
    assert got == status and set(answer) == {"error"} and re.search(message, answer["error"]), answer
    assert "\n" not in answer["error"]
    assert predict(port, "lora", [["a", "b"]])[0] == 200


def raw(port, request: bytes, timeout=10) -> tuple[int, dict]:
    """A hand-written HTTP request (bad framing) and the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"Content-Length: (\d+)", reply).group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def framed(body: bytes, *headers: str) -> bytes:
    return ("POST /predict HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body


@pytest.mark.parametrize("request_bytes, status, message", [
    (framed(GOOD.encode()), 411, "no Content-Length"),
    (framed(GOOD.encode(), "Content-Length: ten"), 400, "Content-Length 'ten' is not a byte count"),
    (framed(GOOD.encode(), "Content-Length: 500"), 408, r"did not reach its Content-Length \(500 bytes\) within 1.0 s"),
    (framed(GOOD.encode(), f"Content-Length: {len(GOOD) - 5}"), 400, "malformed JSON"),
    (framed(b"5\r\nhello\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), 411, "Transfer-Encoding is not supported"),
    (b"GET /predict HTTP/1.1\r\nHost: x\r\n\r\n", 405, "POST to /predict"),
    (b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 404, "POST to /predict, not /other"),
    (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no /nothing"),
    (b"NONSENSE\r\n\r\n", 400, "Bad request syntax"),
])
def test_bad_framing_gets_a_4xx_and_the_next_request_is_served(live, request_bytes, status, message):
    _, port = live
    got, answer = raw(port, request_bytes)
    assert got == status and re.search(message, answer["error"]), answer
    assert predict(port, "dora", [["a", "b"]])[0] == 200


def test_health_says_loading_until_the_adapters_are_loaded(many):
    app = server.App(server.Limits())
    httpd = server.Server(("127.0.0.1", 0), app)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    assert call(port, "GET", "/health") == (503, {"status": "loading"})
    status, answer = predict(port, "lora", [["a", "b"]])
    assert status == 503 and "retry when GET /health is 200" in answer["error"]
    app.start(many, max_queue=4, max_batch=8, max_wait_s=0)
    assert call(port, "GET", "/health")[0] == 200 and predict(port, "lora", [["a", "b"]])[0] == 200
    httpd.shutdown()
    httpd.server_close()
    app.drain(5)


def test_a_full_queue_answers_503_at_once_and_nothing_hangs(many, pairs, references):
    app = server.App(server.Limits())
    taken, release = threading.Event(), threading.Event()

    def held(jobs):  # the worker holds the first request until released
        taken.set()
        release.wait(30)
        return app.score(jobs)

    app.batcher, app.predictor = MicroBatcher(held, max_queue=1, max_rows=1, max_wait_s=0), many
    httpd = server.Server(("127.0.0.1", 0), app)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    answers = {}
    sent = [threading.Thread(target=lambda k=k: answers.update({k: predict(port, "enhanced", [[pairs[0][k], pairs[1][k]]])}))
            for k in range(2)]
    sent[0].start()
    assert taken.wait(30)
    sent[1].start()
    while not app.batcher._queue.qsize():  # the second waits in the queue
        time.sleep(0.01)
    started = time.perf_counter()
    status, answer = predict(port, "dora", [["a", "b"]])
    assert status == 503 and "busy (1 jobs are waiting): retry later" in answer["error"]
    assert time.perf_counter() - started < 5
    release.set()
    for thread in sent:
        thread.join(30)
    for k in range(2):
        expected = softmax(references["enhanced"][k : k + 1].astype(np.float64))
        assert answers[k][0] == 200 and np.abs(np.asarray(answers[k][1]["probabilities"]) - expected).max() <= TOLERANCE
    assert predict(port, "dora", [["a", "b"]])[0] == 200
    httpd.shutdown()
    httpd.server_close()
    app.drain(5)


def test_sigterm_answers_every_accepted_request_then_exits(runs, pairs, references, tmp_path):
    command = [sys.executable, "-m", "flaxlora.serve", "--adapter", f"lora={runs['lora']}", "--adapter",
               f"dora={runs['dora']}", "--port", "0", "--max-wait-ms", "2500", "--max-batch", "8", "--no-warmup"]
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stdout.readline()).group(1))
        assert "ready, adapters lora, dora" in proc.stdout.readline()
        assert call(port, "GET", "/health")[0] == 200
        answers = {}
        senders = [threading.Thread(target=lambda k=k: answers.update({k: predict(port, ("lora", "dora")[k % 2], [
            [pairs[0][k], pairs[1][k]]])})) for k in range(4)]
        for sender in senders:
            sender.start()
        time.sleep(0.5)  # accepted: waiting up to 2.5 s for company
        proc.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(60)
        assert proc.wait(60) == 0 and "stopped" in proc.stdout.read()
    finally:
        proc.kill()
    for k in range(4):
        status, answer = answers[k]
        expected = softmax(references[("lora", "dora")[k % 2]][k : k + 1].astype(np.float64))
        assert status == 200 and np.abs(np.asarray(answer["probabilities"]) - expected).max() <= TOLERANCE
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_cli_errors_are_one_line(runs, tmp_path):
    for argv, message in [(["--adapter", "noequals"], "--adapter 'noequals': give NAME=RUN_FOLDER"),
                          (["--adapter", f"a={runs['lora']}", "--adapter", f"a={runs['dora']}"], "'a' is given twice"),
                          (["--adapter", f"a={tmp_path / 'missing'}", "--port", "0"], "missing")]:
        with pytest.raises(SystemExit) as err:
            server.main(argv)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_the_gpu_throughput_command_dry_runs_on_a_tiny_model(tiny_folder, tmp_path):
    import bench_mixed  # experiments/ (on sys.path: conftest.py)

    out = tmp_path / "mixed.json"
    bench_mixed.main(["--tiny", "--model", str(tiny_folder), "--max-length", "64", "--runs-dir", str(tmp_path / "runs"),
                      "--out", str(out)])
    result = json.loads(out.read_text())
    assert "--tiny" in result["command"] and result["adapters"] == 3 and result["rows_per_adapter"] == 4
    assert result["max_abs_diff_vs_restore"] <= TOLERANCE < result["max_abs_diff_between_two_adapters"]
    for forward in ("forward_only_balanced", "forward_only_skewed"):
        assert result[forward]["max_abs_diff_gather_vs_grouped"] <= TOLERANCE and result[forward]["gather_s"] > 0
    assert result["forward_only_skewed"]["grouped_rows_computed"] > result["forward_only_skewed"]["rows"]
    assert all(v > 0 for v in result["end_to_end"].values())


def test_the_load_test_counts_an_answer_wrong_unless_it_is_restores():
    import bench_serve  # experiments/

    request = bench_serve.Request("a", [["q1", "q2"], ["q3", "q4"]], np.array([[0.7, 0.3], [0.2, 0.8]]))
    right = {"adapter": "a", "probabilities": [[0.7, 0.3], [0.2, 0.8]], "labels": [0, 1]}
    assert not bench_serve.wrong(request, right)
    assert not bench_serve.wrong(request, {**right, "probabilities": [[0.700009, 0.299991], [0.2, 0.8]]})
    for bad in ({"adapter": "b"}, {"probabilities": [[0.70002, 0.29998], [0.2, 0.8]]}, {"labels": [0, 0]},
                {"probabilities": [[0.7, 0.3]], "labels": [0]}):
        assert bench_serve.wrong(request, {**right, **bad}), bad


@pytest.mark.parametrize("name", ["mixed-cpu", "load-cpu"])
def test_the_committed_serving_results_are_the_tables_their_json_makes(name):
    import bench_mixed
    import bench_serve

    folder = ROOT / "experiments" / "results" / "serve"
    result = json.loads((folder / f"{name}.json").read_text())
    script = bench_mixed if name.startswith("mixed") else bench_serve
    assert (folder / f"{name}.md").read_text() == script.markdown(result)
    assert result["command"].split(" --")[0] == f"python experiments/{script.__name__}.py"
