"""`maskedlm serve RUN`: a local web page over a run — fill-mask, live training curves, the sample view.

The Python standard library's threading HTTP server, no framework; the page (static/index.html) is plain
HTML and JavaScript with canvas charts, so it works offline. JSON endpoints:

    GET  /api/info               the run: model shape, tokenizer, step, which weights are loaded
    POST /api/fill               {"text": "... [MASK] ...", "top_k": 5} -> top-k per [MASK]
    GET  /api/metrics?since=N    metrics.jsonl records from line N (the page polls it while a run trains)
    GET  /api/sample?lines=3     held-out text with masked positions and the model's guesses

It binds to 127.0.0.1 unless told otherwise and answers only requests addressed to localhost or its bound
address (or hosts named with --allow-host), so a web page cannot reach it through DNS rebinding; request
bodies and texts are capped; a bad request gets a 4xx status with {"error": "..."}; a connection idle for
30 s is closed. While a run trains, the weights come from its newest checkpoint and are
reloaded when a newer one appears.
"""

from __future__ import annotations

import importlib.resources
import json
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch

from .checkpoint import read_config
from .data import prepare
from .errors import UserError
from .fill import fill_mask, sample_rows
from .hf import is_hf_folder
from .loading import open_folder
from .paths import RunDir
from .plots import read_metrics
from .tokenizer import Tokenizer

MAX_BODY = 16 * 1024  # bytes of a request body
MAX_TEXT = 2000  # characters of a fill-mask text
MAX_TOP_K = 50


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class RunModel:
    """The run's model and tokenizer, reloaded when newer weights appear (a run still training)."""

    def __init__(self, run: Path, device: str = "cpu"):
        self.run, self.device = RunDir(run), torch.device(device)
        self.lock = threading.Lock()
        self.model = self.tokenizer = None
        self.source: str | None = None
        self._stamp: tuple | None = None
        self._sample_stream: np.ndarray | None = None
        self.refresh()

    def _weights_stamp(self) -> tuple:
        final, pointer = self.run.weights, self.run.latest
        return (final.stat().st_mtime_ns if final.exists() else None,
                pointer.read_text().strip() if pointer.exists() else None)

    def refresh(self) -> None:
        """Load the final weights, else the newest checkpoint's (only its weights), else just the tokenizer."""
        stamp = self._weights_stamp()
        if stamp == self._stamp and self.model is not None:
            return
        with self.lock:
            if stamp != (None, None) or is_hf_folder(self.run.path):
                try:
                    loaded = open_folder(self.run.path, self.device, live=True)
                except UserError:
                    if self.model is None:
                        raise
                    return  # the newer weights could not be read (yet): keep serving these; try again next time
                self.model, self.tokenizer, self.source = loaded.model, loaded.tokenizer, loaded.source
            else:
                self.model, self.source = None, None
                if self.run.tokenizer.is_file():
                    self.tokenizer = Tokenizer.from_file(self.run.tokenizer)
            self._stamp = stamp

    def info(self) -> dict:
        out = {"run": self.run.name, "weights": self.source}
        try:
            cfg = read_config(self.run.path)
            out["model"] = {k: getattr(cfg.model, k) for k in ("num_layers", "hidden_size", "num_heads", "vocab_size",
                                                               "max_position")}
            out["tokenizer"] = self.tokenizer.kind if self.tokenizer else None
        except UserError:
            if self.model is not None:
                out["model"] = {"num_layers": self.model.config.num_layers, "hidden_size": self.model.config.hidden_size}
        records, _ = read_metrics(self.run.path)
        steps = [r["step"] for r in records if "step" in r]
        out["step"] = max(steps) if steps else None
        return out

    def fill(self, text: str, top_k: int) -> dict:
        self.refresh()
        if self.model is None:
            raise _BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the run has no weights yet (no checkpoint written so far)")
        with self.lock:
            try:
                preds = fill_mask(self.model, self.tokenizer, text, top_k=top_k)
            except UserError as e:
                raise _BadRequest(HTTPStatus.BAD_REQUEST, str(e)) from None
            ids = self.tokenizer.encode(text)
            tokens = [self.tokenizer.id_to_token(i) for i in ids]
        return {"tokens": tokens, "masks": [[{"token": p.token, "id": p.token_id, "prob": p.prob} for p in m] for m in preds]}

    def sample(self, lines: int) -> dict:
        """Held-out windows with ~15% of tokens masked: each token with the model's guess where masked."""
        self.refresh()
        if self.model is None:
            raise _BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the run has no weights yet")
        if self._sample_stream is None:
            try:
                cfg = read_config(self.run.path)
                valid = prepare(cfg.data, tokenizer=self.tokenizer, log=lambda *a: None).valid
                self._sample_stream = np.asarray(valid.tokens[:20000])
            except UserError as e:
                raise _BadRequest(HTTPStatus.NOT_FOUND, f"no held-out text for this run ({e})") from None
        with self.lock:
            rows = sample_rows(self.model, self.tokenizer, self._sample_stream, lines=lines)
        out = [[{"token": t.token} if t.guess is None else {"token": t.token, "masked": True, "guess": t.guess,
                                                            "correct": t.correct} for t in row] for row in rows]
        masked = [t for row in rows for t in row if t.guess is not None]
        return {"lines": out, "right": sum(t.correct for t in masked), "total": len(masked), "kind": self.tokenizer.kind}


def _page() -> bytes:
    return (importlib.resources.files("maskedlm") / "static" / "index.html").read_bytes()


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class _Server(ThreadingHTTPServer):
    """The HTTP server with what its handlers serve: the run's model and the page, and the host names that
    requests may address (a DNS-rebinding page addresses the server under its own name, and is refused)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: RunModel, allowed_hosts: tuple[str, ...], timeout: float):
        super().__init__(address, _Handler)
        self.state, self.page, self.timeout_s = state, _page(), timeout
        self.allowed_hosts = {h.lower() for h in (*LOOPBACK_NAMES, address[0], *allowed_hosts)}

    def handle_error(self, request, client_address) -> None:
        """A client that went away (or was cut off) is not worth a traceback; anything else gets one line."""
        import sys

        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            print(f"maskedlm serve: request from {client_address[0]} failed: {type(error).__name__}: {error}",
                  file=sys.stderr)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "maskedlm"

    def log_message(self, fmt, *args):  # quiet: no line per request
        pass

    def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def setup(self) -> None:
        self.timeout = self.server.timeout_s  # idle or slow clients are dropped (StreamRequestHandler)
        super().setup()

    def handle_one_request(self) -> None:
        # The socket timeout bounds each read, not the request: a client trickling a byte at a time (slowloris)
        # would hold its thread for ever. The whole request (line, headers, body) must arrive within the
        # timeout, counted from when the connection waits for it; answering it is not bounded.
        self._deadline = threading.Timer(self.server.timeout_s, self._cut_off)
        self._deadline.daemon = True
        self._deadline.start()
        try:
            super().handle_one_request()
        finally:
            self._deadline.cancel()

    def _cut_off(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self, fn) -> None:
        if self.command != "POST":
            self._deadline.cancel()  # the request is in (a POST's body is read in _post)
        try:
            self._check_host()
            fn()
        except _BadRequest as e:
            self._json({"error": str(e)}, e.status)
        except UserError as e:
            self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)

    def _check_host(self) -> None:
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if name not in self.server.allowed_hosts:
            raise _BadRequest(HTTPStatus.FORBIDDEN, f"host {host!r} is not served here (maskedlm serve --allow-host "
                                                    f"NAME lets another name in)")

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._handle(self._get)

    def do_POST(self):  # noqa: N802
        self._handle(self._post)

    def do_PUT(self):  # noqa: N802
        self._json({"error": "method not allowed"}, HTTPStatus.METHOD_NOT_ALLOWED)

    do_DELETE = do_PATCH = do_PUT

    def _get(self) -> None:
        url = urlparse(self.path)
        q, state = parse_qs(url.query), self.server.state
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif url.path == "/api/info":
            self._json(state.info())
        elif url.path == "/api/metrics":
            records, nxt = read_metrics(state.run.path, _int(q, "since", 0, 0, 10**9))
            self._json({"records": records, "next": nxt})
        elif url.path == "/api/sample":
            self._json(state.sample(_int(q, "lines", 3, 1, 10)))
        else:
            raise _BadRequest(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")

    def _post(self) -> None:
        if urlparse(self.path).path != "/api/fill":
            raise _BadRequest(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
        raw_length = (self.headers.get("Content-Length") or "0").strip()
        if not (raw_length.isascii() and raw_length.isdigit() and len(raw_length) <= 12):  # isdigit alone takes '²'
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "Content-Length must be a non-negative integer")
        length = int(raw_length)
        if length > MAX_BODY:
            raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes")
        try:
            raw = self.rfile.read(length)
            if len(raw) < length:
                raise _BadRequest(HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive in time")
            self._deadline.cancel()
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "the body must be JSON (and not nested deeply)") from None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, 'expected {"text": "...", "top_k": 5}')
        text = body["text"]
        if len(text) > MAX_TEXT:
            raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"text over {MAX_TEXT} characters")
        top_k = body.get("top_k", 5)
        if type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K:  # not a bool, which passes isinstance(int)
            raise _BadRequest(HTTPStatus.BAD_REQUEST, f"top_k must be an integer from 1 to {MAX_TOP_K}")
        self._json(self.server.state.fill(text, top_k))


def make_server(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
                allowed_hosts: tuple[str, ...] = (), timeout: float = 30.0) -> ThreadingHTTPServer:
    """The server over a run folder (or transformers folder). Requests must address it as localhost, its bound
    address, or one of `allowed_hosts`; a connection idle or stalled for `timeout` seconds is closed."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"no such run folder: {run}")
    return _Server((host, port), RunModel(run, device), tuple(allowed_hosts), timeout)


def _int(q: dict, key: str, default: int, lo: int, hi: int) -> int:
    if key not in q:
        return default
    try:
        v = int(q[key][0])
    except ValueError:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"{key} must be an integer") from None
    if not lo <= v <= hi:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"{key} must be between {lo} and {hi}")
    return v


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          allowed_hosts: tuple[str, ...] = (), log=print, timeout: float = 30.0) -> None:
    if not timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {timeout}")
    try:
        server = make_server(run, host, port, device, allowed_hosts, timeout)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    log(f"serving {run} on http://{host}:{server.server_address[1]}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
