"""Nothing a client sends holds the server: body and prompt limits up front, malformed HTTP,
slow or vanished clients, a full queue, too many connections. After each, /health is 200 and
the next good request is answered."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from serve_harness import no_end_bias, serving, wait_for

from gemma4_mlx.checkpoint import write_random_checkpoint
from gemma4_mlx.server import model_loader

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LIMIT = 16384


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("serve") / "tiny", dtype="float32")


@pytest.fixture(scope="module")
def served(tiny_path):
    with serving(model_loader(str(tiny_path)), max_body_bytes=LIMIT, max_prompt_tokens=300, max_queue=1,
                 max_connections=6, timeout=1.0) as s:
        yield s


@pytest.fixture()
def client(served):
    yield served.client
    served.client.healthy_and_answering()  # after every test


@pytest.fixture(scope="module")
def tok(tiny_path):
    from gemma4_mlx.loading import load_tokenizer

    return load_tokenizer(tiny_path)  # end ids from the checkpoint's generation_config


def http(method: str, path: str, body: bytes = b"", headers=None, length: bool = True) -> bytes:
    h = {"Host": "127.0.0.1", "Content-Type": "application/json", **(headers or {})}
    if length and "Transfer-Encoding" not in h:
        h.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode("latin-1") + body


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1."), raw[:200]
    return int(raw.split(b" ", 2)[1])


def error_of(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head, raw[:300]
    return json.loads(body)["error"]


def long_stream_request(tok, stream=True, max_tokens=4000) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
                       "stream": stream, "logit_bias": no_end_bias(tok)}).encode()
    return http("POST", CHAT, body)


# -- bodies ------------------------------------------------------------------------------------
def test_declared_oversize_body_is_refused_before_reading(client):
    t = time.monotonic()
    raw = client.raw(http("POST", CHAT, b"", {"Content-Length": str(10**12)}, length=False))
    assert status_of(raw) == 413 and "--max-body-bytes" in error_of(raw)["message"]
    assert time.monotonic() - t < 5


def test_oversize_body_sent_anyway_gets_413(client):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}).encode()
    assert status_of(client.raw(http("POST", CHAT, body))) == 413


def test_expect_continue_oversize_gets_413_without_continue(client):
    raw = client.raw(http("POST", CHAT, b"", {"Content-Length": str(LIMIT + 1), "Expect": "100-continue"},
                          length=False))
    assert status_of(raw) == 413 and b"100 Continue" not in raw


def test_chunked_bodies(client):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    ok = client.raw(http("POST", CHAT, chunked, {"Transfer-Encoding": "chunked"}, length=False))
    assert status_of(ok) == 200
    big = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    raw = client.raw(http("POST", CHAT, big * 5 + b"0\r\n\r\n", {"Transfer-Encoding": "chunked"}, length=False))
    assert status_of(raw) == 413
    for bad in (b"zz\r\nab\r\n0\r\n\r\n", b"5\r\nab"):
        raw = client.raw(http("POST", CHAT, bad, {"Transfer-Encoding": "chunked"}, length=False), shut=True)
        assert raw == b"" or status_of(raw) == 400  # a body cut short: the client is gone, nothing to answer
    raw = client.raw(http("POST", CHAT, body, {"Transfer-Encoding": "chunked", "Content-Length": "5"}, length=False))
    assert status_of(raw) == 400
    raw = client.raw(http("POST", CHAT, body, {"Transfer-Encoding": "gzip"}, length=False))
    assert status_of(raw) == 400


@pytest.mark.parametrize("body,headers,status,word", [
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400, "UTF-8"),
    (b'{"messages": [', {}, 400, "JSON"),
    (b"[" * 3000 + b"]" * 3000, {}, 400, "JSON"),
    (b'{"max_tokens": 1' + b"0" * 5000 + b"}", {}, 400, "JSON"),
    (b"", {}, 400, "JSON"),
    (b'{"messages": []}', {"Content-Type": "text/plain"}, 400, "Content-Type"),
    (b'{"messages": []}', {"Content-Type": "application/x-www-form-urlencoded"}, 400, "Content-Type"),
    (b'{"messages": []}', {"Content-Type": "application/json; charset=latin-1"}, 400, "UTF-8"),
])
def test_malformed_bodies(client, body, headers, status, word):
    raw = client.raw(http("POST", CHAT, body, headers))
    assert status_of(raw) == status and word in error_of(raw)["message"]


def test_missing_content_type_and_length(client):
    raw = client.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}")
    assert status_of(raw) == 400 and error_of(raw)["param"] == "Content-Type"
    raw = client.raw(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\r\n")
    assert status_of(raw) == 411


def test_prompt_token_limit(client):
    r = client.post(CHAT, {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 1})
    assert r.status == 400 and r.json()["error"]["param"] == "messages" and "--max-prompt-tokens" in r.body.decode()
    r = client.post(COMPLETIONS, {"prompt": [5] * 301, "max_tokens": 1})
    assert r.status == 400 and r.json()["error"]["param"] == "prompt"


# -- HTTP itself -------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health\r\n\r\n", 505),
    (b"GET /health HTTP/9.9\r\n\r\n", 505),
    (b"BREW /health HTTP/1.1\r\nHost: localhost\r\n\r\n", 501),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
])
def test_malformed_http_gets_a_json_error(client, raw, status):
    reply = client.raw(raw)
    assert status_of(reply) == status
    assert "message" in error_of(reply)


def test_routes_methods_and_head(client):
    r = client.get("/v1/nothing")
    assert r.status == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get(CHAT)
    assert r.status == 405 and r.headers["allow"] == "POST"
    r = client.request("DELETE", "/v1/models")
    assert r.status == 405 and r.headers["allow"] == "GET"
    r = client.request("HEAD", "/health")
    assert r.status == 405 and r.body == b""
    r = client.post("/health", {"x": 1})
    assert r.status == 405
    assert client.get("/health/").status == 200 and client.get("/health?x=1").status == 200


def test_host_header_must_be_loopback(client):
    r = client.request("GET", "/health", headers={"Host": "evil.example:8080"})
    assert r.status == 403 and "loopback" in r.json()["error"]["message"]
    r = client.request("GET", "/health", headers={"Host": "127.evil.example"})
    assert r.status == 403
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80", "LOCALHOST"):
        assert client.request("GET", "/health", headers={"Host": host}).status == 200, host


# -- slow, vanished and excess clients -------------------------------------------------------
def test_stalled_client_is_dropped_and_others_served(served, client):
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"mess")
        t = time.monotonic()
        assert client.get("/health").status == 200  # answered while the stalled one waits
        s.settimeout(10)
        reply = s.recv(65536)
        assert time.monotonic() - t < 5
        assert reply == b"" or status_of(reply) == 408


def _stream_until_tokens(served, tok, n: int = 3, stream: bool = True) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    s.sendall(long_stream_request(tok, stream=stream))
    if stream:
        got = b""
        while got.count(b"data: ") < n + 1:
            got += s.recv(65536)
    else:
        assert wait_for(lambda: served.app.worker._current is not None and served.app.worker._current.generated > n)
    return s


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_leaves_cancels_its_generation(served, client, tok, stream):
    done = served.app.worker.completed
    s = _stream_until_tokens(served, tok, stream=stream)
    s.close()
    t = time.monotonic()
    assert wait_for(lambda: served.app.worker.completed == done + 1, timeout=10)
    job = served.app.worker.last_job
    assert job.outcome == "cancelled" and job.generated < 4000
    assert time.monotonic() - t < 3


def test_queued_client_that_leaves_is_never_generated(served, client, tok):
    done = served.app.worker.completed
    first = _stream_until_tokens(served, tok)
    queued = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    queued.sendall(long_stream_request(tok, stream=False))
    assert wait_for(lambda: served.app.worker.load == 2)
    queued.close()
    time.sleep(0.3)  # its handler notices; the job waits behind the running one
    first.close()
    assert wait_for(lambda: served.app.worker.completed == done + 2, timeout=10)
    job = served.app.worker.last_job
    assert job.outcome == "cancelled" and job.generated == 0


def test_full_queue_gets_503_with_retry_after(served, client, tok):
    done = served.app.worker.completed
    running = _stream_until_tokens(served, tok)
    queued = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    queued.sendall(long_stream_request(tok, stream=False, max_tokens=2))
    assert wait_for(lambda: served.app.worker.load == 2)
    r = client.post(CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert r.status == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
    assert client.get("/health").status == 200  # busy is not unhealthy
    running.close()
    queued.settimeout(30)
    answer = b""
    while b"chat.completion" not in answer:
        answer += queued.recv(65536)
    assert status_of(answer) == 200  # the queued one was served after the running one left
    queued.close()
    assert wait_for(lambda: served.app.worker.completed == done + 2)


def test_too_many_connections_get_503(served, client):
    idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(6)]
    try:
        time.sleep(0.1)
        raw = client.raw(http("GET", "/health"))
        assert status_of(raw) == 503 and b"Retry-After: 1" in raw
    finally:
        for s in idle:
            s.close()
    assert wait_for(lambda: client.get("/health").status == 200)


def test_many_clients_at_once_all_answered(served, client):
    results = []

    def one(i):
        r = client.post(COMPLETIONS, {"prompt": f"n{i}", "max_tokens": 2})
        results.append(r.status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 5 and set(results) <= {200, 503} and 200 in results
