"""Helpers for the server tests: an in-process server on 127.0.0.1, an HTTP client that reports
what came back (never raises on a status), and a scripted model whose greedy output is a fixed
token sequence."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from gemma4_mlx.server import GemmaHTTPServer, ServerApp, ServerConfig


@dataclass
class Reply:
    status: int
    headers: Dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> List[Any]:
        """SSE ``data:`` payloads, JSON-decoded ("[DONE]" stays a string)."""
        out = []
        for block in self.body.decode("utf-8").split("\n\n"):
            for line in block.splitlines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    out.append(data if data == "[DONE]" else json.loads(data))
        return out


class Client:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.host, self.port = host, port

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, timeout: float = 60) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def post(self, path: str, obj: Any, timeout: float = 60, **headers) -> Reply:
        h = {"Content-Type": "application/json", **headers}
        return self.request("POST", path, json.dumps(obj).encode(), h, timeout=timeout)

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def raw(self, data: bytes, timeout: float = 30, shut: bool = False) -> bytes:
        """Send bytes as they are; what the server answered (until it closes)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                try:
                    b = s.recv(65536)
                except ConnectionResetError:
                    break
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks)

    def healthy_and_answering(self) -> None:
        """The invariant after anything: /health 200 and a good request answered."""
        h = self.get("/health")
        assert h.status == 200, h.body
        r = self.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status == 200, r.body
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@dataclass
class Served:
    app: ServerApp
    httpd: GemmaHTTPServer
    client: Client

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]


@contextlib.contextmanager
def serving(loader, name: str = "tiny", **config):
    cfg = ServerConfig(host="127.0.0.1", port=0, quiet=True, **config)
    app = ServerApp(loader, cfg, model_name=name)
    app.start()
    httpd = GemmaHTTPServer(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Served(app, httpd, Client(httpd.server_address[1]))
    finally:
        httpd.shutdown()
        httpd.server_close()
        assert app.stop(30), "the generation thread did not stop"


def wait_for(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def end_ids(tokenizer) -> List[int]:
    return sorted(int(i) for i in tokenizer.eos_token_ids)


def no_end_bias(tokenizer) -> Dict[str, float]:
    """logit_bias that keeps a random model from ending: generation runs to max_tokens."""
    return {str(i): -100 for i in end_ids(tokenizer)}


class ScriptedModel(nn.Module):
    """Greedy decoding yields ``script`` (token ids) in order, then repeats its last id.

    The position in the script is the cache offset past the prompt; the prompt length is known
    from the first call of a request (a prefill chunk of all tokens but the last, or the last
    token alone), so prompts must fit one prefill chunk.
    """

    def __init__(self, script: Sequence[int], vocab_size: int, context: int = 4096, eos: Sequence[int] = ()):
        super().__init__()
        self.args = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=context, eos_token_id=list(eos))
        self.script = list(script)
        self.layers: list = []
        self._prompt = 0

    def make_cache(self):
        return [KVCache()]

    def __call__(self, inputs: mx.array, cache=None):
        batch, length = inputs.shape
        c = cache[0]
        if c.offset == 0:
            self._prompt = length + 1 if length > 1 else 1
        c.update_and_fetch(mx.zeros((batch, 1, length, 1)), mx.zeros((batch, 1, length, 1)))
        pos = min(max(c.offset - self._prompt, 0), len(self.script) - 1)
        onehot = (mx.arange(self.args.vocab_size) == self.script[pos]).astype(mx.float32) * 20.0
        return mx.broadcast_to(onehot, (batch, length, self.args.vocab_size))


class Forced:
    """Wraps a real model: the k-th token generated for each request is forced to ``script[k]``
    (while k < len(script)); everything else (cache, other positions) is the model's own.

    How the tool-call tests get Gemma 4's markup out of a random model: the test writes the
    markup as token ids (``encode_text``) into ``script``. A request starts with a call at cache
    offset 0, which mlx-lm's and the speculative step both make over all prompt tokens but the
    last (prompts must fit one prefill step), so the prompt has one token more than that call.
    """

    def __init__(self, model, script: Sequence[int] = ()):
        self.model = model
        self.script = list(script)
        self._prompt = 0

    def __getattr__(self, name):  # args, layers, make_cache, model ... are the wrapped model's
        return getattr(self.__dict__["model"], name)

    def __call__(self, inputs: mx.array, cache=None, **kwargs):
        offset = cache[0].offset if cache else 0
        length = inputs.shape[1]
        if offset == 0:
            self._prompt = length + 1
        out = self.model(inputs, cache=cache, **kwargs)
        logits, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        # Row j chooses the token at position offset + j + 1: generated token number k.
        ks = [offset + j + 1 - self._prompt for j in range(length)]
        forced = [self.script[k] if 0 <= k < len(self.script) else -1 for k in ks]
        if any(f >= 0 for f in forced):
            hit = mx.arange(logits.shape[-1])[None, None, :] == mx.array(forced)[None, :, None]
            logits = mx.where(hit, 1e4, logits)
        return (logits, *rest) if rest is not None else logits


def spy_prompts(served, monkeypatch) -> List[List[int]]:
    """Record the token ids of every prompt the served worker is given."""
    seen: List[List[int]] = []
    real = served.app.worker.submit

    def submit(request):
        seen.append(list(request.prompt))
        return real(request)

    monkeypatch.setattr(served.app.worker, "submit", submit)
    return seen
