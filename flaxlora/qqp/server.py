"""Many adapters over HTTP: ``python -m flaxlora.serve --adapter NAME=RUN ... [--host H --port P]``.

    GET  /health   200 {"status": "ok", "adapters": [NAME, ...]} once the adapters are loaded
                   (503 {"status": "loading"} before)
    POST /predict  {"adapter": NAME, "pairs": [[q1, q2], ...]}
                -> {"adapter": NAME, "probabilities": [[p_not_duplicate, p_duplicate], ...], "labels": [0 or 1, ...]}

Requests for any adapters that arrive within ``--max-wait-ms`` of each other are scored as one
mixed batch (:mod:`flaxlora.qqp.many`) by one worker thread that owns the device
(:mod:`flaxlora.microbatch`): a queue of at most ``--max-queue`` requests (a full queue answers
503 at once), at most ``--max-batch`` rows per forward. A bad request gets a 4xx answer
``{"error": "one line naming the problem and the fix"}`` before any work, and the next request is
served as usual. SIGTERM (or Ctrl-C) stops taking connections, answers every request already
accepted, then exits.

Built on the standard library's ``http.server.ThreadingHTTPServer`` (HTTP/1.1 parsing,
keep-alive, a thread per connection) and ``json``: two endpoints need no framework, the batching
is ours whatever the framework, and an ASGI stack (starlette + uvicorn) would add two
dependencies and an event loop in front of the one worker thread that does the work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from flaxlora.cli import ArgumentParser
from flaxlora.data.tokenize import EncodedPairs
from flaxlora.microbatch import Closed, MicroBatcher, QueueFull

log = logging.getLogger("flaxlora.serve")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold, and how long the server waits on it."""

    max_pairs: int = 64  # pairs per request
    max_question_chars: int = 2000  # characters per question (QQP's longest is about 1,200)
    max_body_bytes: int = 1 << 20
    timeout_s: float = 10.0  # for a request's body to arrive, and for an idle keep-alive connection
    answer_timeout_s: float = 120.0  # for the worker's answer (a full queue of large batches on a CPU)


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and a one-line reason."""

    def __init__(self, status: HTTPStatus, reason: str, close: bool = False):
        super().__init__(reason)
        self.status, self.reason, self.close = status, reason, close


def parse_predict(body: bytes, adapters: Sequence[str], limits: Limits) -> tuple[str, list[str], list[str]]:
    """``(adapter, q1s, q2s)`` of a /predict body, or BadRequest naming what is wrong with it."""
    bad = lambda reason: BadRequest(HTTPStatus.BAD_REQUEST, reason)  # noqa: E731
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"the body is not UTF-8 (byte 0x{body[err.start]:02x} at {err.start}): send JSON in UTF-8") from None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of 5,000 digits, arrays nested 10,000 deep
        raise bad(f"unreadable JSON: {str(err).splitlines()[0][:200]}") from None
    shape = 'send {"adapter": NAME, "pairs": [[question1, question2], ...]}'
    if not isinstance(request, dict):
        raise bad(f"the body is a JSON {type(request).__name__}, not an object: {shape}")
    unknown = sorted(set(request) - {"adapter", "pairs"})
    if unknown or "adapter" not in request or "pairs" not in request:
        problem = f"unknown field {unknown[0]!r}" if unknown else "a field is missing"
        raise bad(f"{problem}: {shape}")
    adapter, pairs = request["adapter"], request["pairs"]
    if not isinstance(adapter, str):
        raise bad(f'"adapter" must be a string naming a loaded adapter ({", ".join(adapters)})')
    if adapter not in adapters:
        raise BadRequest(HTTPStatus.NOT_FOUND, f"unknown adapter {adapter[:100]!r}: the loaded adapters are "
                                               f"{', '.join(adapters)}")
    if not isinstance(pairs, list):
        raise bad(f'"pairs" must be a list of [question1, question2]: {shape}')
    if not pairs:
        raise bad('"pairs" is empty: send at least one [question1, question2]')
    if len(pairs) > limits.max_pairs:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(pairs)} pairs: at most {limits.max_pairs} per "
                                                              "request (--max-pairs); split it")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(q, str) for q in pair)):
            raise bad(f"pairs[{i}] must be [question1, question2], two strings, got {json.dumps(pair)[:80]}")
        for j, question in enumerate(pair):
            if len(question) > limits.max_question_chars:
                raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"pairs[{i}][{j}] has {len(question)} characters: at most "
                                 f"{limits.max_question_chars} (--max-question-chars)")
            try:
                question.encode("utf-8")
            except UnicodeEncodeError as err:
                raise bad(f"pairs[{i}][{j}] holds an unpaired surrogate at {err.start}: send valid Unicode") from None
    return adapter, [p[0] for p in pairs], [p[1] for p in pairs]


class App:
    """The server's state: the predictor (None while loading), its micro-batcher and the requests
    being answered (for a graceful shutdown)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.predictor = None
        self.batcher: MicroBatcher | None = None
        self._answering = 0
        self._idle = threading.Condition()

    def start(self, predictor, max_queue: int, max_batch: int, max_wait_s: float) -> None:
        """Serves ``predictor`` (a :class:`flaxlora.qqp.many.MultiPredictor`) from now on."""
        self.batcher = MicroBatcher(self.score, max_queue, max_batch, max_wait_s)
        self.predictor = predictor

    def score(self, jobs: Sequence[tuple[str, EncodedPairs]]) -> list[dict[str, Any]]:
        """The answers of several requests (adapter, tokenised pairs), scored as one mixed batch."""
        names = [adapter for adapter, encoded in jobs for _ in range(len(encoded))]
        logits = self.predictor.logits_encoded(EncodedPairs.concatenate([e for _, e in jobs]), names)
        logits = logits.astype(np.float64)
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        labels = logits.argmax(-1)
        answers, start = [], 0
        for adapter, encoded in jobs:
            rows = slice(start, start + len(encoded))
            answers.append({"adapter": adapter, "probabilities": probabilities[rows].tolist(),
                            "labels": labels[rows].tolist()})
            start += len(encoded)
        return answers

    def rows(self, adapter: str, pairs: int) -> int:
        """The batch rows a request takes: one per pair and member of its adapter."""
        return pairs * len(self.predictor.members[adapter])

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        with self._idle:
            self._answering += 1
        try:
            yield
        finally:
            with self._idle:
                self._answering -= 1
                self._idle.notify_all()

    def drain(self, timeout: float) -> None:
        """Takes no new requests; answers the accepted ones, waiting up to ``timeout`` s."""
        if self.batcher is not None:
            self.batcher.close(timeout)
        with self._idle:
            self._idle.wait_for(lambda: self._answering == 0, timeout)


class Handler(BaseHTTPRequestHandler):
    """GET /health, POST /predict (module doc); every answer is JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client sends many requests over one connection
    wbufsize = -1  # an answer's headers and body leave in one write (flushed after each request) ...
    disable_nagle_algorithm = True  # ... at once, not after the client's delayed ACK
    default_request_version = "HTTP/1.0"  # a malformed request line is answered with a status line too
    server: "Server"

    def setup(self) -> None:
        self.timeout = self.server.app.limits.timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def reply(self, status: HTTPStatus, payload: dict[str, Any], close: bool = False) -> None:
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long, ...), in JSON."""
        self.reply(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase}, close=True)

    def do_GET(self) -> None:
        if self.path == "/predict":
            return self.reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "POST to /predict"})
        if self.path != "/health":
            return self.reply(HTTPStatus.NOT_FOUND, {"error": f"no {self.path[:100]}: GET /health or POST /predict"})
        app = self.server.app
        if app.predictor is None:
            return self.reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "loading"})
        self.reply(HTTPStatus.OK, {"status": "ok", "adapters": list(app.predictor.names)})

    def do_POST(self) -> None:
        app = self.server.app
        try:
            if self.path != "/predict":
                raise BadRequest(HTTPStatus.NOT_FOUND if self.path != "/health" else HTTPStatus.METHOD_NOT_ALLOWED,
                                 f"POST to /predict, not {self.path[:100]}", close=True)
            body = self.read_body(app.limits)
            if app.predictor is None:
                raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "loading the adapters: retry when GET /health is 200")
            adapter, q1s, q2s = parse_predict(body, app.predictor.names, app.limits)
            with app.answering():
                try:
                    encoded = app.predictor.encode(q1s, q2s)  # in this thread, beside the worker's forward
                    future = app.batcher.submit((adapter, encoded), rows=app.rows(adapter, len(q1s)))
                except QueueFull as err:
                    raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, f"busy ({err}): retry later") from None
                except Closed:
                    raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down", close=True) from None
                try:
                    answer = future.result(app.limits.answer_timeout_s)
                except TimeoutError:
                    raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, f"no answer within {app.limits.answer_timeout_s} "
                                                                     "s: the server is overloaded; retry later") from None
                except Exception as err:  # the forward failed: this request fails, the server goes on
                    log.exception("scoring failed")
                    raise BadRequest(HTTPStatus.INTERNAL_SERVER_ERROR,
                                     f"scoring failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
                self.reply(HTTPStatus.OK, answer)
        except BadRequest as err:
            self.reply(err.status, {"error": err.reason}, close=err.close)

    def read_body(self, limits: Limits) -> bytes:
        """The request's body, read by its Content-Length (no chunked encoding)."""
        if self.headers.get("Transfer-Encoding"):
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length; "
                                                         "Transfer-Encoding is not supported", close=True)
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "no Content-Length: send one with the JSON body", close=True)
        if not declared.strip().isdigit():
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"Content-Length {declared[:40]!r} is not a byte count",
                             close=True)
        length = int(declared)
        if length > limits.max_body_bytes:
            self.discard(length, limits.timeout_s)
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body of {length} bytes: at most "
                                                                  f"{limits.max_body_bytes}; split the request", close=True)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise BadRequest(HTTPStatus.REQUEST_TIMEOUT, f"the body did not reach its Content-Length ({length} "
                                                         f"bytes) within {limits.timeout_s} s", close=True) from None
        if len(body) != length:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"the body has {len(body)} bytes, its Content-Length {length}",
                             close=True)
        return body


    def discard(self, length: int, seconds: float) -> None:
        """Reads and drops up to ``length`` body bytes for at most ``seconds`` (as nginx's lingering
        close does), so that closing the connection does not reset it before the client reads the answer."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(OSError):
            while length > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(length, 1 << 16))
                if not chunk:
                    return
                length -= len(chunk)


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer carrying the :class:`App` its handlers answer from."""

    daemon_threads = True  # an idle keep-alive connection does not hold the process at exit

    def __init__(self, address: tuple[str, int], app: App):
        super().__init__(address, Handler)
        self.app = app


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """``{NAME: RUN}`` of ``--adapter NAME=RUN`` flags; ValueError for a malformed or repeated name."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, run = spec.partition("=")
        if not sep or not name or not run:
            raise ValueError(f"--adapter {spec!r}: give NAME=RUN_FOLDER")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice")
        adapters[name] = run
    return adapters


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m flaxlora.serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=RUN",
                   help="a run's output folder (or checkpoints/ folder, or an ensemble run's) served as NAME; repeat")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed)")
    p.add_argument("--step", type=int, help="checkpoint step of every run (default: each run's latest)")
    p.add_argument("--max-batch", type=int, default=64, help="rows per forward at most (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its forward (default 5 ms)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more answer 503 (default 64)")
    p.add_argument("--max-pairs", type=int, default=Limits.max_pairs, help="pairs per request at most")
    p.add_argument("--max-question-chars", type=int, default=Limits.max_question_chars,
                   help="characters per question at most")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile each batch size on first use instead of before /health answers 200")
    return p


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch``: a batch pads to the next (at most 2x)."""
    return tuple(sorted({*(2**k for k in range(max_batch.bit_length()) if 2**k < max_batch), max_batch}))


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        adapters = parse_adapters(args.adapter)
        if args.max_batch < 1 or args.max_queue < 1 or args.max_pairs < 1 or args.max_wait_ms < 0:
            raise ValueError("--max-batch, --max-queue and --max-pairs must be >= 1, --max-wait-ms >= 0")
        app = App(Limits(max_pairs=args.max_pairs, max_question_chars=args.max_question_chars))
        server = Server((args.host, args.port), app)
    except (ValueError, OSError) as err:
        p.fail(err)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    host, port = server.server_address[:2]
    print(f"flaxlora.serve: listening on http://{host}:{port}", flush=True)
    try:
        from flaxlora.qqp.many import restore_many

        predictor = restore_many(adapters, args.step, batch_sizes(args.max_batch))
        if args.warmup:
            predictor.warmup()
    except (ValueError, FileNotFoundError) as err:
        server.shutdown()
        server.server_close()
        p.fail(err)
    stop = threading.Event()  # a signal before this point ends the process at once: nothing was accepted
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    app.start(predictor, args.max_queue, args.max_batch, args.max_wait_ms / 1000)
    print(f"flaxlora.serve: ready, adapters {', '.join(predictor.names)}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()  # no new connections
    server.server_close()
    app.drain(app.limits.answer_timeout_s)  # every accepted request answered
    print("flaxlora.serve: stopped", flush=True)
    sys.exit(0)
