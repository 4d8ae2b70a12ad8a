"""``gemma4-mlx serve``: a small OpenAI-compatible HTTP server for one Gemma 4 model.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with SSE streaming),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.

What it guarantees (docs/usage.md says it for users):

* It serves the model it was started with and nothing else: no request field loads, opens or
  fetches anything (``model`` is echoed as the served id; image/audio/file parts get a 400).
* Every body is bounded (``max_body_bytes``, checked from ``Content-Length`` before reading and
  while reading a chunked body), must be UTF-8 JSON sent as ``application/json``, and is
  validated field by field (:mod:`gemma4_mlx.server_api`) before it reaches the model; the
  prompt is bounded (``max_prompt_tokens``) and prompt + ``max_tokens`` must fit the context.
* Message contents are tokenized as text (``chat_format.encode_prompt``): only the chat
  template writes control tokens. ``tools`` are declared through the template too, and the
  model's tool-call markup comes back as ``tool_calls``, never in ``content``.
* Started with a draft model, every request is decoded speculatively with the exact step of
  :mod:`gemma4_mlx.speculative` (greedy replies are the plain server's); requests never load one.
* One generation thread (:mod:`gemma4_mlx.server_worker`) with a bounded queue: a request that
  finds it full gets 503 with ``Retry-After``; a client that disconnects (or stops reading a
  stream) has its generation cancelled at the next token or prefill chunk.
* Every request gets an answer (a JSON error when not a result); one request's failure never
  stops the server. Bound to 127.0.0.1 it answers only requests addressed to a loopback name
  (a guard against DNS rebinding) and sends no CORS headers.
* Under ``mlx.launch`` the model is sharded over the processes; rank 0 serves and every other
  rank runs each of its generations in step with it (:mod:`gemma4_mlx.server_distributed`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

from .interrupts import sigint_handled
from .server_api import (
    APIError,
    GenerationRequest,
    Limits,
    bad,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    model_card,
    models_list,
    parse_chat,
    parse_completion,
    tool_call_deltas,
    usage_chunk,
)
from .server_worker import Busy, Failed, Finished, Job, Piece, Worker

__all__ = ["ServerConfig", "ServerApp", "GemmaHTTPServer", "model_loader", "serve", "serve_follower"]

ROUTES = ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_name: Optional[str] = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int = 16384
    max_tokens_limit: Optional[int] = None
    default_max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_queue: int = 8
    max_connections: int = 64
    timeout: float = 60.0  # seconds a client may stall while sending or receiving
    prefill_step_size: int = 2048
    num_draft_tokens: int = 3  # per speculative step, when the loader gives a draft model
    quiet: bool = False
    debug: bool = False


class ClientGone(Exception):
    pass


class ServerApp:
    """The served model, its limits and the generation worker (everything but HTTP).

    ``loader()`` returns ``(model, tokenizer)`` or ``(model, tokenizer, draft_model)``; it runs
    in the generation thread. ``lockstep``: rank 0 of a sharded model (the other ranks follow).
    """

    def __init__(self, loader, config: ServerConfig, model_name: str = "gemma4", lockstep=None):
        self.config = config
        self.model_name = config.model_name or model_name
        self.created = int(time.time())
        self.worker = Worker(loader, max_queue=config.max_queue, prefill_step_size=config.prefill_step_size,
                             debug=config.debug, num_draft_tokens=config.num_draft_tokens, lockstep=lockstep)
        self.limits: Optional[Limits] = None

    def render_chat(self, messages: List[Dict[str, Any]], think: bool,
                    tools: Optional[List[Dict[str, Any]]] = None) -> List[int]:
        from .chat_format import _template_source, encode_prompt, has_chat_template

        if tools and has_chat_template(self.tokenizer) and "tools" not in _template_source(self.tokenizer):
            raise bad("tools", "this model's chat template cannot declare tools (it never reads `tools`); "
                               "serve a checkpoint whose template has tool support")
        return encode_prompt(self.tokenizer, messages, think=think, tools=tools)

    def encode_raw(self, text: str) -> List[int]:
        """A completion prompt as the model sees it (control tokens parsed), BOS first once."""
        from .chat_format import encode_text

        ids = encode_text(self.tokenizer, text)
        bos_id = getattr(self.tokenizer, "bos_token_id", None)
        if isinstance(bos_id, int) and (not ids or ids[0] != bos_id):
            ids = [bos_id] + ids
        return ids

    def start(self) -> None:
        """Load the model in the worker, then generate one token, so a model that cannot run
        fails here, before anything listens."""
        config = self.config
        self.worker.start()
        self.model, self.tokenizer = self.worker.model, self.worker.tokenizer
        args = getattr(self.model, "args", None)
        vocab = getattr(args, "vocab_size", None)
        if not isinstance(vocab, int) or vocab <= 0:
            raise ValueError("the model does not declare its vocab_size")
        self.limits = Limits(
            vocab_size=vocab, context=getattr(args, "max_position_embeddings", None),
            max_prompt_tokens=config.max_prompt_tokens, max_tokens_limit=config.max_tokens_limit,
            default_max_tokens=config.default_max_tokens, temperature=config.temperature,
            top_p=config.top_p, top_k=config.top_k, min_p=config.min_p,
        )
        # With a draft model, enough tokens for one round of proposals.
        probe_tokens = 1 if self.worker.draft_model is None else 2 + min(config.num_draft_tokens, 2)
        probe = parse_chat({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": probe_tokens,
                            "temperature": 0}, self.limits, self.render_chat)
        job = self.worker.submit(probe)
        while not job.done.wait(0.25):
            pass
        events = [job.events.get() for _ in range(job.events.qsize())]
        if job.outcome != "finished":
            failed = next((e for e in events if isinstance(e, Failed)), None)
            raise RuntimeError(f"the model failed its first generation: {failed.message if failed else job.outcome}")

    def stop(self, timeout: float = 60.0) -> bool:
        return self.worker.stop(timeout)


# -- HTTP ------------------------------------------------------------------------------------
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")


def _printable(text: str, limit: int = 300) -> str:
    text = text[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gemma4-mlx"
    sys_version = ""
    server: "GemmaHTTPServer"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.timeout = self.server.app.config.timeout
        super().setup()

    # Every method lands in _dispatch; methods a route does not take get 405.
    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    # -- plumbing --------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        if self.server.app.config.quiet:
            return
        sys.stderr.write(f"{self.address_string()} - [{self.log_date_time_string()}] {_printable(format % args)}\n")

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # no status line, no headers: unanswerable properly
            self.send_error(505, "HTTP/0.9 is not supported")
            return False
        return True

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """The stdlib's own errors (malformed request line, headers too long, ...) as JSON."""
        if self.request_version == "HTTP/0.9":  # the request line did not parse: answer as HTTP/1.0
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._write_json(code, APIError(code, message or phrase, type="invalid_request_error").body(), close=True)

    def handle_expect_100(self) -> bool:
        """Refuse an over-long body before the client sends it."""
        length = (self.headers.get("Content-Length") or "").strip()
        if _CONTENT_LENGTH.fullmatch(length) and int(length) > self.server.app.config.max_body_bytes:
            self._error(self._too_large(int(length)))
            return False
        return super().handle_expect_100()

    def _write_json(self, status: int, obj: Any, headers: Optional[Dict[str, str]] = None, close: bool = False) -> None:
        data = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, e: APIError) -> None:
        if getattr(self, "_responded", False):  # a stream already started: nothing more to say
            self.close_connection = True
            return
        # The body may be unread: never reuse the connection after an error, and let the
        # client finish sending before closing (closing on unread data resets the connection,
        # which can destroy the answer before the client reads it).
        self._linger = not getattr(self, "_body_read", False) and bool(
            self.headers and (self.headers.get("Content-Length", "0").strip() not in ("", "0")
                              or self.headers.get("Transfer-Encoding")))
        self._write_json(e.status, e.body(), headers=e.headers, close=True)

    def finish(self) -> None:
        super().finish()
        if getattr(self, "_linger", False):
            self._linger = False
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.5)
                drained, deadline = 0, time.monotonic() + 1.0
                while drained < (1 << 20) and time.monotonic() < deadline:
                    data = self.connection.recv(65536)
                    if not data:
                        break
                    drained += len(data)
            except OSError:
                pass

    def _too_large(self, n: Optional[int] = None) -> APIError:
        limit = self.server.app.config.max_body_bytes
        size = f"of {n} bytes " if n is not None else ""
        return APIError(413, f"the request body {size}exceeds this server's limit of {limit} bytes (--max-body-bytes)",
                        type="invalid_request_error")

    def _dispatch(self) -> None:
        self._responded = False
        self._body_read = False
        try:
            self._check_host()
            path = urlsplit(self.path).path
            if len(path) > 1:
                path = path.rstrip("/")
            route = self._route(path)
            if route is None:
                raise APIError(404, f"no route {_printable(path, 100)!r}; this server has: {', '.join(ROUTES)}",
                               type="not_found_error")
            method, action = route
            if self.command != method:
                raise APIError(405, f"{path} takes {method}, not {_printable(self.command, 20)}",
                               headers={"Allow": method})
            action()
        except APIError as e:
            self._error(e)
        except (ClientGone, BrokenPipeError, ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug of ours still answers, and the server lives on
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"gemma4-mlx serve: internal error on {_printable(self.path, 100)}: {type(e).__name__}: {line}",
                  file=sys.stderr)
            if self.server.app.config.debug:
                traceback.print_exc()
            try:
                self._error(APIError(500, "internal server error", type="server_error"))
            except OSError:
                self.close_connection = True

    def _route(self, path: str):
        if path == "/health":
            return "GET", self._health
        if path == "/v1/models":
            return "GET", self._models
        if path.startswith("/v1/models/"):
            return "GET", lambda: self._model(path[len("/v1/models/"):])
        if path == "/v1/chat/completions":
            return "POST", self._chat
        if path == "/v1/completions":
            return "POST", self._completion
        return None

    def _check_host(self) -> None:
        """Bound to loopback, answer only requests addressed to a loopback name (DNS rebinding)."""
        if not self.server.loopback:
            return
        host = self.headers.get("Host")
        if host is None:
            return
        name = host.strip().lower()
        if name.startswith("["):
            name = name[1:name.find("]")] if "]" in name else name[1:]
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        if name == "localhost" or name.endswith(".localhost"):
            return
        try:
            if ipaddress.ip_address(name).is_loopback:
                return
        except ValueError:
            pass
        raise APIError(403, f"Host {_printable(host, 80)!r} is not a loopback name: this server is bound to "
                            f"{self.server.app.config.host} and answers only requests to localhost "
                            "(start it with --host to serve other names)", type="permission_error")

    # -- reading a request -----------------------------------------------------------------
    def _json_body(self) -> Any:
        ctype = self.headers.get("Content-Type")
        if ctype is None or self.headers.get_content_type() != "application/json":
            raise APIError(400, "Content-Type must be application/json"
                           + (f", got {_printable(ctype, 80)!r}" if ctype else " (the header is missing)"),
                           param="Content-Type")
        charset = self.headers.get_param("charset")
        if isinstance(charset, str) and charset.lower().replace("-", "") != "utf8":
            raise APIError(400, f"the body must be UTF-8, not {_printable(charset, 40)!r}", param="Content-Type")
        body = self._read_body()
        self._body_read = True
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the body is not valid UTF-8 (byte {e.start})") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise APIError(400, f"the body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
        except (RecursionError, ValueError) as e:
            raise APIError(400, f"the body is not valid JSON: {type(e).__name__} (nested too deep or a number too long)") from None

    def _read_body(self) -> bytes:
        limit = self.server.app.config.max_body_bytes
        encodings = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        try:
            if encodings:
                if lengths:
                    raise APIError(400, "a request cannot have both Content-Length and Transfer-Encoding")
                if [t.strip().lower() for t in ",".join(encodings).split(",")] != ["chunked"]:
                    raise APIError(400, "the only Transfer-Encoding accepted is chunked")
                return self._read_chunked(limit)
            if not lengths:
                raise APIError(411, "Content-Length is required (or Transfer-Encoding: chunked)")
            if len(lengths) > 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
                raise APIError(400, "Content-Length must be one non-negative integer")
            n = int(lengths[0])
            if n > limit:
                raise self._too_large(n)
            data = self.rfile.read(n)
            if len(data) < n:
                raise ClientGone
            return data
        except (TimeoutError, socket.timeout):
            raise APIError(408, f"the request body did not arrive within {self.server.app.config.timeout:g} s") from None

    def _read_chunked(self, limit: int) -> bytes:
        parts: List[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1026)
            if not line:
                raise ClientGone
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not _CHUNK_SIZE.fullmatch(size):
                raise APIError(400, "malformed chunked body")
            n = int(size, 16)
            if n == 0:
                for _ in range(64):  # trailers, up to the blank line
                    line = self.rfile.readline(8194)
                    if line in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
                raise APIError(400, "malformed chunked body (trailers)")
            total += n
            if total > limit:
                raise self._too_large()
            data = self.rfile.read(n)
            if len(data) < n:
                raise ClientGone
            parts.append(data)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise APIError(400, "malformed chunked body")

    # -- routes ----------------------------------------------------------------------------
    def _health(self) -> None:
        app = self.server.app
        ok = app.worker.alive()
        self._write_json(200 if ok else 503, {"status": "ok" if ok else "unavailable", "model": app.model_name,
                                              "requests": app.worker.load})

    def _models(self) -> None:
        app = self.server.app
        self._write_json(200, models_list(app.model_name, app.created))

    def _model(self, name: str) -> None:
        app = self.server.app
        if name != app.model_name:
            raise APIError(404, f"this server serves only {app.model_name!r}", param="model", type="not_found_error",
                           code="model_not_found")
        self._write_json(200, model_card(app.model_name, app.created))

    def _chat(self) -> None:
        app = self.server.app
        self._generate(parse_chat(self._json_body(), app.limits, app.render_chat))

    def _completion(self) -> None:
        app = self.server.app
        self._generate(parse_completion(self._json_body(), app.limits, app.encode_raw))

    # -- generation ------------------------------------------------------------------------
    def _generate(self, request: GenerationRequest) -> None:
        try:
            job = self.server.app.worker.submit(request)
        except Busy as e:
            raise APIError(503, f"{e}; retry later", type="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        try:
            if request.stream:
                self._stream(job)
            else:
                self._whole(job)
        finally:
            if not job.done.is_set():
                job.cancel.set()  # the client left, a write failed, or we failed: stop generating

    def _client_gone(self) -> bool:
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, job: Job):
        checked = time.monotonic()
        while True:
            try:
                event = job.events.get(timeout=0.05)
            except queue.Empty:
                event = None
            now = time.monotonic()
            if event is None or now - checked > 0.25:
                checked = now
                if self._client_gone():
                    job.cancel.set()
                    raise ClientGone
            if event is None:
                continue
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    @staticmethod
    def _failure(event: Failed) -> APIError:
        if event.status == 499:  # cancelled while the client is still here: we are shutting down
            return APIError(503, "the server is shutting down", type="server_error")
        return APIError(event.status, event.message, type="server_error")

    def _whole(self, job: Job) -> None:
        app, req = self.server.app, job.request
        text: List[str] = []
        reasoning: List[str] = []
        logprobs: List[Dict[str, Any]] = []
        calls: List[Any] = []
        for event in self._events(job):
            if isinstance(event, Piece):
                text.append(event.text)
                reasoning.append(event.reasoning)
                logprobs.extend(event.logprobs or [])
                calls.extend(event.tool_calls)
            elif isinstance(event, Failed):
                raise self._failure(event)
            else:
                args = (event.finish_reason, event.prompt_tokens, event.completion_tokens, logprobs)
                if req.kind == "chat":
                    body = chat_response(req, app.model_name, "".join(text), "".join(reasoning), *args,
                                         tool_calls=calls)
                else:
                    body = completion_response(req, app.model_name, "".join(text), *args)
                self._write_json(200, body)

    def _send_event(self, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self.wfile.write(b"data: " + data + b"\n\n")

    def _stream(self, job: Job) -> None:
        app, req = self.server.app, job.request
        name = app.model_name
        self._responded = True
        self.close_connection = True  # an SSE body ends when the connection does
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        chat = req.kind == "chat"
        if chat:
            self._send_event(chat_chunk(req, name, {"role": "assistant", "content": ""}))
        offset = calls = 0
        for event in self._events(job):
            if isinstance(event, Piece):
                if chat:
                    delta: Dict[str, Any] = {}
                    if event.reasoning:
                        delta["reasoning_content"] = event.reasoning
                    if event.text:
                        delta["content"] = event.text
                    if event.tool_calls:
                        delta["tool_calls"] = tool_call_deltas(event.tool_calls, calls)
                        calls += len(event.tool_calls)
                    self._send_event(chat_chunk(req, name, delta, logprobs=event.logprobs))
                else:
                    self._send_event(completion_chunk(req, name, event.text, logprobs=event.logprobs, offset=offset))
                    offset += len(event.text)
            elif isinstance(event, Failed):
                self._send_event(self._failure(event).body())
                self._send_event(b"[DONE]")
            else:
                if chat:
                    self._send_event(chat_chunk(req, name, {}, finish=event.finish_reason))
                else:
                    self._send_event(completion_chunk(req, name, "", finish=event.finish_reason))
                if req.include_usage:
                    self._send_event(usage_chunk(req, name, event.prompt_tokens, event.completion_tokens))
                self._send_event(b"[DONE]")


class GemmaHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once (more get 503 at once)."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, app: ServerApp, host: str, port: int):
        self.app = app
        self._connections = 0
        self._count_lock = threading.Lock()
        try:
            self.loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = host.lower() == "localhost"
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        with self._count_lock:
            full = self._connections >= self.app.config.max_connections
            if not full:
                self._connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._count_lock:
                self._connections -= 1
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self._connections -= 1

    def _refuse(self, request) -> None:
        body = json.dumps(APIError(503, "too many connections; retry later", type="server_error").body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(2.0)
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # Errors outside a handler's own try (a client vanishing mid-parse): one line, no traceback.
        exc = sys.exc_info()[1]
        if self.app.config.debug:
            super().handle_error(request, client_address)
        elif not isinstance(exc, (ConnectionError, TimeoutError)):
            print(f"gemma4-mlx serve: connection from {client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)


# -- start and stop --------------------------------------------------------------------------
def model_loader(model: str, adapter_path: Optional[str] = None, strict_memory: bool = False,
                 draft_model: Optional[str] = None):
    """A loader for :class:`ServerApp`: (model, tokenizer), with ``draft_model`` (a folder or repo
    id: a smaller Gemma 4 or a gemma4_assistant MTP drafter) (model, tokenizer, drafter); any
    failure is one line (a drafter's starts with ``--draft-model``)."""

    def load_served():
        from .generation import load_with_adapters
        from .loading import resolve_model_path

        served = load_with_adapters(resolve_model_path(model), adapter_path, strict_memory=strict_memory)
        if draft_model is None:
            return served
        return (*served, load_drafter(draft_model, served[0]))

    return load_served


def load_drafter(path: str, target):
    """The draft model at ``path``, checked against ``target`` (vocabulary; an MTP drafter's
    hidden size and KV shapes)."""
    from .assistant import AssistantModel
    from .speculative import AssistantDrafter, check_vocab, load_draft_model

    try:
        drafter = load_draft_model(path)
        check_vocab(target, drafter)
        if isinstance(drafter, AssistantModel):
            AssistantDrafter(drafter, target)  # raises when this drafter was made for another model
    except Exception as e:  # noqa: BLE001 - one line naming the option, whatever went wrong
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DraftModelError(f"--draft-model: {line}" if str(path) in line else f"--draft-model {path}: {line}") from e
    return drafter


class DraftModelError(ValueError):
    """A draft model that cannot be loaded or cannot draft for the served model."""


def served_name(model: str) -> str:
    local = Path(model).expanduser()
    return (local.resolve().name if local.exists() else str(model)) or str(model)


class _Terminate(BaseException):
    pass


def serve_follower(config: ServerConfig, model: str, adapter_path: Optional[str] = None,
                   strict_memory: bool = False, draft_model: Optional[str] = None) -> int:
    """A rank other than 0 of a sharded ``serve``: load this process's shard, then run every
    generation rank 0 announces, in step with it, until it stops the server (exit 0)."""
    from .distributed import world
    from .peer_watch import PEER_LOST_GRACE, PeerWatch, group_connections
    from .server_distributed import Lockstep, follow

    group = world()
    connections = group_connections()
    worker = Worker(model_loader(model, adapter_path, strict_memory, draft_model), debug=config.debug,
                    prefill_step_size=config.prefill_step_size, num_draft_tokens=config.num_draft_tokens)
    worker.load_models()
    # Ctrl-C in mlx.launch's terminal reaches every process; rank 0 decides when the group
    # stops (a process leaving on its own would strand the others in a collective).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    followed = threading.Event()

    def rank0_lost(why: str) -> None:
        # follow() raises GroupLost itself when MLX fails the collective; where MLX never
        # completes it (peer_watch.py), this process leaves without it
        if not followed.wait(PEER_LOST_GRACE):
            print(f"error: rank 0 is gone ({why})", file=sys.stderr, flush=True)
            os._exit(1)

    PeerWatch(connections, rank0_lost).start()
    try:
        follow(worker, Lockstep(group), debug=config.debug)
    finally:
        followed.set()
    print(f"gemma4-mlx serve: rank {group.rank()}: rank 0 stopped the server", file=sys.stderr, flush=True)
    return 0


def serve(config: ServerConfig, model: str, adapter_path: Optional[str] = None, strict_memory: bool = False,
          draft_model: Optional[str] = None, group=None) -> int:
    """Load, check, bind, serve until SIGINT (exit 130) or SIGTERM (exit 0). Every failure before
    listening is a LoadError/OSError with one line; the caller prints it. ``group``: this is rank
    0 of a sharded model (the other ranks run :func:`serve_follower`);
    a rank that leaves the group stops the server (exit 1)."""
    from .peer_watch import PeerWatch, group_connections
    from .server_distributed import Lockstep

    connections = [] if group is None else group_connections()
    app = ServerApp(model_loader(model, adapter_path, strict_memory, draft_model), config,
                    model_name=served_name(model), lockstep=None if group is None else Lockstep(group))
    try:
        app.start()
    except KeyboardInterrupt:
        # The loader cannot be interrupted mid-read: leave without tearing MLX down under it.
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    except BaseException as e:
        app.stop(30)
        from .config import ConfigError
        from .loading import LoadError

        if isinstance(e, (LoadError, ConfigError, ValueError, OSError, RuntimeError, KeyError)) or \
                not isinstance(e, Exception):
            raise
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LoadError(f"{model}: the model could not be loaded ({type(e).__name__}{': ' + line if line else ''})") from e
    try:
        httpd = GemmaHTTPServer(app, config.host, config.port)
    except OSError as e:
        app.stop(5)
        raise OSError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None

    def terminate(signum, frame):
        raise _Terminate

    # The group broke: leave serve_forever (from another thread: shutdown() waits for it).
    app.worker.on_fatal = lambda why: threading.Thread(target=httpd.shutdown, daemon=True).start()
    if app.worker.fatal is not None:
        app.worker.on_fatal(app.worker.fatal)
    PeerWatch(connections, app.worker.peer_lost).start()
    previous = signal.signal(signal.SIGTERM, terminate)
    drafting = (f"; speculative decoding with {draft_model}, {config.num_draft_tokens} drafted tokens per step"
                if draft_model is not None else "")
    sharded = "" if group is None else f"; sharded over {group.size()} processes"
    print(f"gemma4-mlx serve: {app.model_name} on {httpd.url} (POST /v1/chat/completions, /v1/completions; "
          f"GET /v1/models, /health){drafting}{sharded}; Ctrl-C stops", file=sys.stderr, flush=True)
    code = 0
    try:
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        sigint_handled()  # a graceful stop: an error while stopping is reported as itself
        code = 130
    except _Terminate:
        code = 0
    finally:
        # A second signal while stopping ends the process at once (no C++ teardown mid-step).
        def hurry(signum, frame):
            os._exit(code)

        signal.signal(signal.SIGINT, hurry)
        signal.signal(signal.SIGTERM, hurry)
        print("gemma4-mlx serve: stopping", file=sys.stderr, flush=True)
        httpd.server_close()
        # a broken group may hold the generation thread in a collective that never ends
        stopped = app.stop(timeout=60 if app.worker.fatal is None else 5)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not stopped:
            if app.worker.fatal is not None:
                print(f"error: {app.worker.fatal}", file=sys.stderr, flush=True)
                os._exit(1)
            print("gemma4-mlx serve: the generation did not stop within 60 s; exiting", file=sys.stderr, flush=True)
            os._exit(code)
    if app.worker.fatal is not None:
        print(f"error: {app.worker.fatal}", file=sys.stderr, flush=True)
        return 1
    return code
