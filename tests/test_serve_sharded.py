"""`gemma4-mlx serve` sharded over 2 local processes (MLX's ring backend, what `mlx.launch
--backend ring -n 2` sets up): rank 0 serves and the other rank follows every generation
(gemma4_mlx/server_distributed.py).

The replies must be the single-process server's (greedy, same checkpoint), bad requests get the
same errors, a client that leaves mid-stream stops the generation on both ranks (the next request
is still answered, in step), and stopping rank 0 ends every rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

import pytest
from serve_harness import Client, no_end_bias, serving, wait_for
from sharding_worker import free_ports

from gemma4_mlx.checkpoint import write_random_checkpoint
from gemma4_mlx.server import model_loader

HERE = Path(__file__).parent
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
START_TIMEOUT = 120
PREFILL_STEP = 8  # prompts longer than this take several prefill steps (each one agreed by the ranks)


# -- a sharded server: 2 processes -------------------------------------------------------------
class Group:
    """``gemma4-mlx serve`` as ranks 0..n-1 of a ring group, each logging to its own file."""

    def __init__(self, model: Path, folder: Path, n: int = 2, extra: List[str] = ()):
        hostfile = folder / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
        env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}
        command = [sys.executable, "-m", "gemma4_mlx.cli", "serve", "--model", str(model), "--port", "0",
                   "--quiet", "--prefill-step-size", str(PREFILL_STEP), *extra]
        self.logs = [folder / f"rank{r}.log" for r in range(n)]
        self.procs = []
        for rank, log in enumerate(self.logs):
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(command, env={**env, "MLX_RANK": str(rank)},
                                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def logs_text(self) -> str:
        return "\n".join(f"--- rank {r}:\n{self.log(r)[-3000:]}" for r in range(len(self.procs)))

    def port(self) -> int:
        """Rank 0's port, once it listens."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            m = re.search(r"http://127\.0\.0\.1:(\d+)", self.log(0))
            if m:
                return int(m.group(1))
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        raise AssertionError(f"the sharded server did not start:\n{self.logs_text()}")

    def wait(self, timeout: float = 30) -> List[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"rank {self.procs.index(p)} did not exit:\n{self.logs_text()}") from None
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("sharded-serve") / "tiny", dtype="float32", seed=3)


@pytest.fixture(scope="module")
def tok(tiny_path):
    from gemma4_mlx.loading import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def single(tiny_path):
    """The same checkpoint served by one process."""
    with serving(model_loader(str(tiny_path)), prefill_step_size=PREFILL_STEP) as served:
        yield served.client


@pytest.fixture(scope="module")
def group(tiny_path, tmp_path_factory):
    g = Group(tiny_path, tmp_path_factory.mktemp("group"))
    try:
        g.client = Client(g.port())
        yield g
    finally:
        g.kill()


def _same(value: Any) -> Any:
    """A reply without what differs between two servers' answers to one request (ids, times)."""
    if isinstance(value, dict):
        return {k: _same(v) for k, v in value.items() if k not in ("id", "created")}
    if isinstance(value, list):
        return [_same(v) for v in value]
    return value


def _reply(client: Client, path: str, body: dict) -> Any:
    r = client.post(path, body)
    assert r.status == 200, r.body
    return _same(r.events() if body.get("stream") else r.json())


# -- what rank 0 sends ------------------------------------------------------------------------
def test_a_job_reaches_the_other_ranks_whole():
    from gemma4_mlx.server_api import GenerationRequest
    from gemma4_mlx.server_distributed import decode_job, encode_job

    request = GenerationRequest(
        kind="chat", prompt=[2, 105, 7, 8], max_tokens=9, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
        seed=2**64 - 1, stop=["\n\n", "é"], logit_bias={3: -100.0, 17: 2.5}, repetition_penalty=1.1,
        presence_penalty=0.2, xtc_probability=0.3, logprobs=True, top_logprobs=3, stream=True, think=True,
        tools=[WEATHER], tool_choice="none", parallel_tool_calls=False, id="chatcmpl-x", created=5)
    assert decode_job(encode_job(request, (1, 2**32 - 1))) == (request, (1, 2**32 - 1))


# -- the replies -------------------------------------------------------------------------------
def test_greedy_replies_equal_the_single_process_server(group, single, tok):
    no_end = no_end_bias(tok)
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}],
            "max_tokens": 10, "logit_bias": no_end}
    bodies = [
        (COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 10, "logit_bias": no_end}),
        (COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 10, "logit_bias": no_end, "stream": True}),
        (CHAT, chat),
        (CHAT, {**chat, "stream": True, "stream_options": {"include_usage": True}}),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}),  # end tokens allowed
        (COMPLETIONS, {"prompt": " ".join(["word"] * 40), "max_tokens": 6, "logit_bias": no_end}),  # 5 prefill steps
        # tools: the tool-response token ends a reply; tool_choice none bans the call token
        (CHAT, {**chat, "tools": [WEATHER]}),
        (CHAT, {**chat, "tools": [WEATHER], "tool_choice": "none", "stream": True}),
    ]
    for path, body in bodies:
        assert _reply(group.client, path, body) == _reply(single, path, body), (path, body)


def test_stop_strings_end_every_rank_at_the_same_token(group, single, tok):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "logit_bias": no_end_bias(tok)}
    text = single.post(COMPLETIONS, body).json()["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    cut = {**body, "stop": [stop]}
    got = _reply(group.client, COMPLETIONS, cut)
    assert got == _reply(single, COMPLETIONS, cut)
    assert got["choices"][0]["finish_reason"] == "stop" and got["usage"]["completion_tokens"] < 16
    assert _reply(group.client, COMPLETIONS, body) == _reply(single, COMPLETIONS, body)  # still in step


def test_logprobs_equal_the_single_process_server(group, single, tok):
    body = {"messages": [{"role": "user", "content": "Count"}], "max_tokens": 6, "logit_bias": no_end_bias(tok),
            "logprobs": True, "top_logprobs": 2}
    got, want = (c.post(CHAT, body).json()["choices"][0] for c in (group.client, single))
    assert got["message"] == want["message"]
    got_lp, want_lp = got["logprobs"]["content"], want["logprobs"]["content"]
    assert [e["token"] for e in got_lp] == [e["token"] for e in want_lp]
    for g, w in zip(got_lp, want_lp):  # the sharded model's logits: within float rounding
        assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-3)


def test_sampling_is_the_same_on_every_rank(group, tok):
    """temperature > 0: seeded twice gives one reply; unseeded still succeeds (a rank that drew
    another token would fail the request: every rank's token is compared at every step)."""
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "logit_bias": no_end_bias(tok)}
    seeded = [_reply(group.client, COMPLETIONS, {**body, "seed": 7}) for _ in range(2)]
    assert seeded[0] == seeded[1]
    for _ in range(2):
        assert group.client.post(COMPLETIONS, body).status == 200
    xtc = {**body, "xtc_probability": 0.5, "xtc_threshold": 0.01, "top_p": 0.9, "repetition_penalty": 1.3}
    assert group.client.post(COMPLETIONS, xtc).status == 200


# -- what ends a request early -----------------------------------------------------------------
@pytest.mark.parametrize("body, raw", [
    ({"messages": []}, None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, None),
    ({"prompt": "hi", "max_tokens": 0}, None),
    ({"prompt": [100000]}, None),  # a token outside the vocabulary
    (None, b"{not json"),
])
def test_bad_requests_get_the_single_process_errors(group, single, body, raw):
    path = CHAT if body and "messages" in body else COMPLETIONS
    if raw is None:
        got, want = group.client.post(path, body), single.post(path, body)
    else:
        headers = {"Content-Type": "application/json"}
        got, want = (c.request("POST", path, raw, headers) for c in (group.client, single))
    assert got.status == want.status and got.status in (400, 413, 422)
    assert got.json() == want.json()


def _open_stream(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    got = b""
    while got.count(b"data: ") < 4:  # the role chunk and some tokens
        more = s.recv(65536)
        assert more, got
        got += more
    return s


def test_a_client_leaving_mid_stream_stops_every_rank(group, single, tok):
    long = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 4000, "stream": True,
            "logit_bias": no_end_bias(tok)}
    _open_stream(group.client.port, long).close()
    # 4000 tokens take far longer than this: the generation was cancelled, on both ranks
    assert wait_for(lambda: group.client.get("/health").json()["requests"] == 0, timeout=15)
    assert group.client.get("/health").status == 200
    body = {"messages": [{"role": "user", "content": "again"}], "max_tokens": 8, "logit_bias": no_end_bias(tok)}
    assert _reply(group.client, CHAT, body) == _reply(single, CHAT, body)


def test_stopping_rank_0_mid_generation_ends_every_rank(group, tok):
    """Ctrl-C on rank 0 while it streams: the generation stops at the next step on both ranks,
    rank 0 exits 130 and the other rank 0, both without a traceback. (Ends the module's group.)"""
    stream = _open_stream(group.client.port, {"messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                                              "stream": True, "logit_bias": no_end_bias(tok)})
    try:
        group.procs[0].send_signal(signal.SIGINT)
        codes = group.wait(timeout=60)
        while stream.recv(65536):  # the stream ends; it does not hang
            pass
    finally:
        stream.close()
    assert codes == [130, 0], group.logs_text()
    for rank in range(2):
        log = group.log(rank)
        assert "Traceback" not in log and "terminate called" not in log, group.logs_text()
    assert "stopping" in group.log(0)


def test_rank_0_that_cannot_listen_ends_every_rank(tiny_path, tmp_path):
    """An error of rank 0 after loading (its port is taken): one error line, and the other rank
    is told to stop rather than left waiting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        g = Group(tiny_path, tmp_path, extra=["--port", str(taken.getsockname()[1])])
        try:
            codes = g.wait(timeout=START_TIMEOUT)
        finally:
            g.kill()
    assert codes == [1, 0], g.logs_text()
    errors = [line for line in g.log(0).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot listen on" in errors[0], g.logs_text()
    assert "Traceback" not in g.log(1), g.logs_text()


def _endless_stream(g: Group, tok) -> socket.socket:
    """A streamed chat reply that will not end on its own (no end token, 4,000 tokens), opened
    and under way: the group is mid-generation."""
    return _open_stream(g.port(), {"messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                                   "stream": True, "logit_bias": no_end_bias(tok)})


@pytest.mark.parametrize("compiled", ["0", "1"])
def test_a_rank_that_dies_mid_generation_ends_the_server(tiny_path, tok, tmp_path, monkeypatch, compiled):
    """The other rank killed while rank 0 streams: the client gets an error event, and rank 0
    exits 1 with one error line instead of waiting forever for the lost rank. With the compiled
    decode step (the default on a GPU) rank 0 had queued the next step's collectives, and MLX's
    ring never completes one queued after a peer is lost: it hung in about half the runs until
    peer_watch.py (session 18)."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", compiled)
    g = Group(tiny_path, tmp_path)
    try:
        stream = _endless_stream(g, tok)
        g.procs[1].kill()
        rest = b""
        while True:
            more = stream.recv(65536)
            if not more:
                break
            rest += more
        stream.close()
        code = g.procs[0].wait(timeout=60)
    finally:
        g.kill()
    assert code == 1, g.logs_text()
    assert b"is gone" in rest and rest.endswith(b"data: [DONE]\n\n"), rest[-500:]
    errors = [line for line in g.log(0).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: another process of the group is gone"), g.logs_text()
    assert "Traceback" not in g.log(0), g.logs_text()


@pytest.mark.parametrize("compiled", ["0", "1"])
def test_rank_0_dying_mid_generation_ends_the_other_ranks(tiny_path, tok, tmp_path, monkeypatch, compiled):
    """Rank 0 killed while it streams: the other rank exits 1 with one error line, whether MLX
    fails its collective or leaves it waiting (peer_watch.py)."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", compiled)
    g = Group(tiny_path, tmp_path)
    try:
        stream = _endless_stream(g, tok)
        g.procs[0].kill()
        stream.close()
        code = g.procs[1].wait(timeout=60)
    finally:
        g.kill()
    assert code == 1, g.logs_text()
    # (the other ranks' stderr carries their rank: distributed.quiet_other_ranks)
    errors = [line for line in g.log(1).splitlines() if line.startswith("[rank 1] error:")]
    assert len(errors) == 1 and errors[0].startswith("[rank 1] error: rank 0 is gone"), g.logs_text()
    assert "Traceback" not in g.log(1), g.logs_text()


@pytest.mark.parametrize("drafter", ["gemma4", "mtp"])
def test_speculative_decoding_sharded_gives_the_plain_replies(drafter, tiny_path, single, tok, tmp_path):
    """--draft-model (the model itself, sharded too; or an MTP drafter, whole on each rank): the
    greedy replies of the plain single-process server; a stop string ends both ranks'
    speculative steps together."""
    draft = tiny_path
    if drafter == "mtp":
        from gemma4_mlx.assistant import random_assistant_config, write_random_assistant
        from gemma4_mlx.loading import model_args

        config = random_assistant_config(model_args(tiny_path), layers=2, hidden_size=32, ordered=False)
        draft = write_random_assistant(config, tmp_path / "mtp", seed=1)
    g = Group(tiny_path, tmp_path, extra=["--draft-model", str(draft), "--num-draft-tokens", "2"])
    try:
        client = Client(g.port())
        body = {"prompt": "Once upon a time", "max_tokens": 12, "logit_bias": no_end_bias(tok)}
        text = single.post(COMPLETIONS, body).json()["choices"][0]["text"]
        for request in (body, {**body, "stream": True}, {**body, "stop": [text[len(text) // 2:][:2]]}, body):
            assert _reply(client, COMPLETIONS, request) == _reply(single, COMPLETIONS, request), request
        g.procs[0].send_signal(signal.SIGTERM)
        assert g.wait(timeout=60) == [0, 0], g.logs_text()
    finally:
        g.kill()
