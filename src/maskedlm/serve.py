"""`maskedlm serve RUN`: a local web page over a run — fill-mask, live training curves, the sample view.

The Python standard library's threading HTTP server, no framework; the page (static/index.html) is plain
HTML and JavaScript with canvas charts, so it works offline. JSON endpoints:

    GET  /api/info               the run: model shape, tokenizer, step, which weights are loaded
    POST /api/fill               {"text": "... [MASK] ...", "top_k": 5} -> top-k per [MASK]
    GET  /api/metrics?since=N    metrics.jsonl records from line N (the page polls it while a run trains)
    GET  /api/sample?lines=3     held-out text with masked positions and the model's guesses

It binds to 127.0.0.1 unless told otherwise; request bodies and texts are capped; a bad request gets a
4xx status with {"error": "..."}. While a run trains, the weights come from its newest checkpoint and are
reloaded when a newer one appears.
"""

from __future__ import annotations

import importlib.resources
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch

from .errors import UserError
from .plots import read_metrics

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
        self.run, self.device = run, torch.device(device)
        self.lock = threading.Lock()
        self.model = self.tokenizer = None
        self.source: str | None = None
        self._stamp: tuple | None = None
        self._sample_stream: np.ndarray | None = None
        self.refresh()

    def _weights_stamp(self) -> tuple:
        final = self.run / "model.safetensors"
        pointer = self.run / "checkpoints" / "latest"
        return (final.stat().st_mtime_ns if final.exists() else None,
                pointer.read_text().strip() if pointer.exists() else None)

    def refresh(self) -> None:
        from .checkpoint import find_checkpoint, load, load_weights, read_config
        from .hf import is_hf_folder
        from .model import BertForPreTraining
        from .tokenizer import Tokenizer

        stamp = self._weights_stamp()
        if stamp == self._stamp and self.model is not None:
            return
        with self.lock:
            if stamp[0] is not None or is_hf_folder(self.run):
                self.model, self.tokenizer = load(self.run, self.device)
                self.source = "model.safetensors"
            elif stamp[1] is not None:
                cfg = read_config(self.run)
                ckpt = find_checkpoint(self.run)  # only the weights: not the optimizer state and RNG files
                model = BertForPreTraining(cfg.model)
                load_weights(model, ckpt / "model.safetensors")
                self.model, self.tokenizer = model.to(self.device).eval(), Tokenizer.from_file(self.run / "tokenizer.json")
                self.source = f"checkpoint {ckpt.name}"
            else:
                self.model, self.source = None, None
                if (self.run / "tokenizer.json").is_file():
                    self.tokenizer = Tokenizer.from_file(self.run / "tokenizer.json")
            self._stamp = stamp

    def info(self) -> dict:
        from .checkpoint import read_config

        out = {"run": self.run.name, "weights": self.source}
        try:
            cfg = read_config(self.run)
            out["model"] = {k: getattr(cfg.model, k) for k in ("num_layers", "hidden_size", "num_heads", "vocab_size",
                                                               "max_position")}
            out["tokenizer"] = self.tokenizer.kind if self.tokenizer else None
        except UserError:
            if self.model is not None:
                out["model"] = {"num_layers": self.model.config.num_layers, "hidden_size": self.model.config.hidden_size}
        records, _ = read_metrics(self.run)
        steps = [r["step"] for r in records if "step" in r]
        out["step"] = max(steps) if steps else None
        return out

    def fill(self, text: str, top_k: int) -> dict:
        from .fill import fill_mask

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
        from .checkpoint import read_config
        from .data import prepare
        from .masking import select_positions

        self.refresh()
        if self.model is None:
            raise _BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the run has no weights yet")
        if self._sample_stream is None:
            try:
                cfg = read_config(self.run)
                self._sample_stream = np.asarray(prepare(cfg.data, tokenizer=self.tokenizer, log=lambda *a: None).valid.tokens[:20000])
            except UserError as e:
                raise _BadRequest(HTTPStatus.NOT_FOUND, f"no held-out text for this run ({e})") from None
        stream, tok = self._sample_stream, self.tokenizer
        from .fill import mask_logits

        gen = torch.Generator().manual_seed(0)
        window = min(48, len(stream))
        out, right, total = [], 0, 0
        with self.lock:
            for start in dict.fromkeys(np.linspace(0, len(stream) - window, num=lines).astype(int).tolist()):
                ids = torch.tensor([tok.special.cls, *stream[start:start + window].tolist(), tok.special.sep])
                chosen = select_positions(ids, special_ids=tok.special.all(), mask_prob=0.15, generator=gen)
                pos = chosen.nonzero().squeeze(1)
                guesses = {}
                if len(pos):
                    masked = torch.where(chosen, torch.full_like(ids, tok.special.mask), ids)
                    guesses = dict(zip(pos.tolist(), mask_logits(self.model, masked, pos).argmax(-1).tolist()))
                row = []
                for p in range(1, len(ids) - 1):
                    t = {"token": tok.id_to_token(int(ids[p]))}
                    if p in guesses:
                        t.update(masked=True, guess=tok.id_to_token(guesses[p]), correct=guesses[p] == int(ids[p]))
                        right, total = right + t["correct"], total + 1
                    row.append(t)
                out.append(row)
        return {"lines": out, "right": right, "total": total, "kind": tok.kind}


def _page() -> bytes:
    return (importlib.resources.files("maskedlm") / "static" / "index.html").read_bytes()


def make_server(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> ThreadingHTTPServer:
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"no such run folder: {run}")
    state = RunModel(run, device)
    page = _page()

    class Handler(BaseHTTPRequestHandler):
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

        def _handle(self, fn) -> None:
            try:
                fn()
            except _BadRequest as e:
                self._json({"error": str(e)}, e.status)
            except UserError as e:
                self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            q = parse_qs(url.query)

            def get():
                if url.path in ("/", "/index.html"):
                    self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
                elif url.path == "/api/info":
                    self._json(state.info())
                elif url.path == "/api/metrics":
                    since = _int(q, "since", 0, 0, 10**9)
                    records, nxt = read_metrics(run, since)
                    self._json({"records": records, "next": nxt})
                elif url.path == "/api/sample":
                    self._json(state.sample(_int(q, "lines", 3, 1, 10)))
                else:
                    raise _BadRequest(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")

            self._handle(get)

        def do_POST(self):  # noqa: N802
            def post():
                if urlparse(self.path).path != "/api/fill":
                    raise _BadRequest(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes")
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise _BadRequest(HTTPStatus.BAD_REQUEST, "the body must be JSON") from None
                if not isinstance(body, dict) or not isinstance(body.get("text"), str):
                    raise _BadRequest(HTTPStatus.BAD_REQUEST, 'expected {"text": "...", "top_k": 5}')
                text = body["text"]
                if len(text) > MAX_TEXT:
                    raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"text over {MAX_TEXT} characters")
                top_k = body.get("top_k", 5)
                if not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
                    raise _BadRequest(HTTPStatus.BAD_REQUEST, f"top_k must be an integer from 1 to {MAX_TOP_K}")
                self._json(state.fill(text, top_k))

            self._handle(post)

        def do_PUT(self):  # noqa: N802
            self._json({"error": "method not allowed"}, HTTPStatus.METHOD_NOT_ALLOWED)

        do_DELETE = do_PATCH = do_PUT

    return ThreadingHTTPServer((host, port), Handler)


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


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", log=print) -> None:
    try:
        server = make_server(run, host, port, device)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    log(f"serving {run} on http://{host}:{server.server_address[1]}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
