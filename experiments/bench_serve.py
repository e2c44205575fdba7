"""Load test of ``python -m flaxlora.serve`` over loopback: concurrent clients, a mix of adapters
and request sizes, bounded in requests and time; every answer checked against
``flaxlora.restore(run)`` of its adapter.

    python experiments/bench_serve.py --out experiments/results/serve/load-cpu.json
    python experiments/bench_serve.py --tiny --out /tmp/load-tiny.json     # dry run on a tiny random BERT

Starts the server on 127.0.0.1 (a free port) with N untrained adapters (random non-zero factors:
experiments/random_adapters.py; speed does not depend on what an adapter learned), measures the
latency of lone requests of each size (one at a time), then for each client count C: C threads
each sending requests back to back over a keep-alive connection until ``--requests`` are answered
or ``--max-seconds`` pass. Reports p50/p99 latency per size, pairs/s, lost answers (no 200),
wrong answers (a probability more than 1e-5 from restore's, or another label), and p99 over the
lone latency of the same size. Ends the server with SIGTERM and checks it exits cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: its sibling helpers
# This process (the references) and the server share one accelerator: neither takes most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

TOLERANCE = 1e-5
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Request:
    adapter: str
    pairs: list[list[str]]
    probabilities: np.ndarray  # restore's answer, (len(pairs), 2)

    def body(self) -> bytes:
        return json.dumps({"adapter": self.adapter, "pairs": self.pairs}).encode()


def request_pool(runs: dict[str, Path], sizes: list[int], count: int, seed: int = 0) -> list[Request]:
    """``count`` requests of bundled QQP pairs, adapters and sizes drawn at random, each with the
    probabilities that ``flaxlora.restore`` of its adapter gives."""
    import flaxlora
    from flaxlora.qqp.data import load_qqp

    data = load_qqp(None)["train"]
    rng = np.random.default_rng(seed)
    drawn = [(str(rng.choice(list(runs))), int(rng.choice(sizes))) for _ in range(count)]
    starts = np.cumsum([0] + [n for _, n in drawn])
    q1s, q2s = list(data.question1[: starts[-1]]), list(data.question2[: starts[-1]])
    pool = []
    for name in runs:
        predictor = flaxlora.restore(runs[name])
        mine = [i for i, (a, _) in enumerate(drawn) if a == name]
        rows = [r for i in mine for r in range(starts[i], starts[i + 1])]
        if not rows:
            continue
        logits = predictor.logits([q1s[r] for r in rows], [q2s[r] for r in rows])
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        at = 0
        for i in mine:
            n = drawn[i][1]
            pool.append((i, Request(name, [[q1s[r], q2s[r]] for r in range(starts[i], starts[i + 1])],
                                    probabilities[at : at + n])))
            at += n
    return [request for _, request in sorted(pool, key=lambda x: x[0])]


def post(connection: http.client.HTTPConnection, request: Request) -> tuple[int, dict]:
    connection.request("POST", "/predict", request.body(), {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def wrong(request: Request, answer: dict) -> bool:
    """The answer is not restore's: another adapter, a probability off by more than 1e-5, or a
    label that is not the likelier class (a tie within 1e-5 may go either way)."""
    got = np.asarray(answer.get("probabilities"), np.float64)
    if answer.get("adapter") != request.adapter or got.shape != request.probabilities.shape:
        return True
    expected = request.probabilities
    labels = np.asarray(answer.get("labels"))
    decided = np.abs(expected[:, 1] - expected[:, 0]) > TOLERANCE
    return bool(np.abs(got - expected).max() > TOLERANCE
                or np.any(labels[decided] != expected[decided].argmax(-1)))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def lone_latency(host: str, port: int, pool: list[Request], sizes: list[int], repeats: int) -> dict[int, float]:
    """Median seconds of a request of each size sent alone, one after another on one connection."""
    connection = http.client.HTTPConnection(host, port, timeout=300)
    lone = {}
    for size in sizes:
        samples = [r for r in pool if len(r.pairs) == size][:repeats]
        times = []
        for request in samples:
            start = time.perf_counter()
            status, answer = post(connection, request)
            times.append(time.perf_counter() - start)
            if status != 200 or wrong(request, answer):
                raise SystemExit(f"a lone request was answered {status}: {answer}")
        lone[size] = float(np.median(times))
    connection.close()
    return lone


def load(host: str, port: int, pool: list[Request], clients: int, total: int, max_seconds: float) -> dict:
    """``clients`` threads sending pool requests back to back until ``total`` are sent or time is up."""
    lock = threading.Lock()
    records: list[tuple[int, float, int, bool]] = []  # (size, seconds, status, wrong)
    next_index = iter(range(total))
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=300)
        while time.perf_counter() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            request = pool[i % len(pool)]
            start = time.perf_counter()
            try:
                status, answer = post(connection, request)
                bad = status == 200 and wrong(request, answer)
            except (OSError, http.client.HTTPException, ValueError):
                status, bad = 0, False
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=300)
            with lock:
                records.append((len(request.pairs), time.perf_counter() - start, status, bad))
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    answered = [r for r in records if r[2] == 200]
    by_size = {}
    for size in sorted({r[0] for r in records}):
        latencies = [r[1] for r in answered if r[0] == size]
        by_size[size] = {"requests": len(latencies), "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99)}
    latencies = [r[1] for r in answered]
    return {"clients": clients, "requests": len(records), "answered": len(answered),
            "lost": len(records) - len(answered), "statuses": sorted({r[2] for r in records}),
            "wrong": sum(r[3] for r in records), "seconds": elapsed,
            "pairs_per_s": sum(r[0] for r in answered) / elapsed, "requests_per_s": len(answered) / elapsed,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "by_size": by_size}


def start_server(runs: dict[str, Path], max_batch: int, max_wait_ms: float, timeout: float) -> tuple[subprocess.Popen, int]:
    """The server on 127.0.0.1 and its port, once GET /health answers 200."""
    command = [sys.executable, "-m", "flaxlora.serve", "--port", "0", "--max-batch", str(max_batch),
               "--max-wait-ms", str(max_wait_ms), *[f"--adapter={name}={run}" for name, run in runs.items()]]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    line = server.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    port = int(match.group(1))
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/health")
        if connection.getresponse().status == 200:
            connection.close()
            return server, port
        connection.close()
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server was not ready within {timeout} s")


def markdown(result: dict) -> str:
    """The result as the table the .md beside the JSON holds."""
    sizes = [str(size) for size in result["sizes"]]
    lines = [f"`{result['command']}`", "",
             f"{result['model']}, {result['adapters']} adapters ({', '.join(result['adapter_kinds'])}; "
             f"{result['adapters_are']}); {result['pairs']}, requests of {', '.join(sizes)} pairs drawn uniformly; "
             f"server --max-batch {result['server']['max_batch']} --max-wait-ms {result['server']['max_wait_ms']:g} on "
             f"127.0.0.1; {result['cpu_count']} CPUs; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in result['load_average_1_5_15_min_at_end'])}. Lone request (p50): "
             + ", ".join(f"{size} pairs {result['lone_p50_s'][size] * 1000:.0f} ms" for size in sizes)
             + f". Server exit code after SIGTERM: {result['server_exit_code_after_sigterm']}.", "",
             "| clients | requests | lost | wrong | pairs/s | " + " | ".join(
                 f"{size} pairs: p50 / p99 ms (p99 ÷ lone)" for size in sizes) + " |",
             "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
    for phase in result["phases"]:
        cells = []
        for size in sizes:
            row = phase["by_size"].get(size) or phase["by_size"].get(int(size))
            cells.append(f"{row['p50_s'] * 1000:.0f} / {row['p99_s'] * 1000:.0f} ({row['p99_over_lone']:.1f})")
        lines.append(f"| {phase['clients']} | {phase['requests']} | {phase['lost']} | {phase['wrong']} | "
                     f"{phase['pairs_per_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6", help="short name or local Hugging Face folder (BERT family)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--sizes", default="1,4,16", help="pairs per request, drawn uniformly")
    p.add_argument("--clients", default="1,2,4,8", help="concurrent clients, one load phase each")
    p.add_argument("--requests", type=int, default=120, help="requests per load phase at most")
    p.add_argument("--max-seconds", type=float, default=60, help="seconds per load phase at most")
    p.add_argument("--lone", type=int, default=8, help="lone requests per size")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms")
    p.add_argument("--runs-dir", help="where the random adapters are written (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="dry run: 2 adapters, sizes 1,2, clients 2, 12 requests")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args(argv)
    if args.tiny:
        args.adapters, args.sizes, args.clients, args.requests, args.lone, args.max_batch = 2, "1,2", "2", 12, 2, 4
    sizes, client_counts = [int(s) for s in args.sizes.split(",")], [int(c) for c in args.clients.split(",")]
    started = time.perf_counter()
    from flaxlora.loading import load_pretrained
    from random_adapters import random_runs, variant_names

    folder = Path(args.runs_dir or tempfile.mkdtemp(prefix="bench-serve-"))
    runs = random_runs(load_pretrained(args.model, num_labels=2), args.model, args.adapters, folder)
    pool = request_pool(runs, sizes, max(args.requests, args.lone * len(sizes) * 2))
    server, port = start_server(runs, args.max_batch, args.max_wait_ms, timeout=900)
    try:
        lone = lone_latency("127.0.0.1", port, pool, sizes, args.lone)
        phases = []
        for clients in client_counts:
            phase = load("127.0.0.1", port, pool, clients, args.requests, args.max_seconds)
            for size, row in phase["by_size"].items():
                row["p99_over_lone"] = row["p99_s"] / lone[size]
            phases.append(phase)
            print(json.dumps({k: v for k, v in phase.items() if k != "by_size"}), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = None
    result = {
        "command": "python experiments/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "adapters": args.adapters, "adapter_kinds": variant_names(args.adapters),
        "adapters_are": "untrained: random non-zero b and extras (experiments/random_adapters.py)",
        "pairs": "bundled QQP sample (flaxlora/qqp/qqp_sample), train split, in order",
        "sizes": sizes, "server": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms},
        "cpu_count": os.cpu_count(), "lone_p50_s": {str(k): v for k, v in lone.items()},
        "phases": phases, "server_exit_code_after_sigterm": exit_code, "tolerance": TOLERANCE,
        "wall_s": time.perf_counter() - started,
        "load_average_1_5_15_min_at_end": os.getloadavg(),  # other processes on this machine meanwhile
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(json.loads(json.dumps(result))))  # as read back
    problems = [f"{p['clients']} clients: {p['lost']} lost, {p['wrong']} wrong" for p in phases if p["lost"] or p["wrong"]]
    if problems or exit_code != 0:
        raise SystemExit(f"load test failed: {'; '.join(problems) or f'server exit code {exit_code}'}")
    return result


if __name__ == "__main__":
    main()
