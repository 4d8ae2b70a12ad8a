"""`gemma4-mlx serve` answers an OpenAI-style request over HTTP on the loopback interface."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from gemma4_mlx.checkpoint import write_random_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_chat_completion(tmp_path):
    model = write_random_checkpoint("tiny", tmp_path / "tiny", dtype="float32")
    port = _free_port()
    cmd = [sys.executable, "-m", "gemma4_mlx.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:  # bounded: the server starts within a minute or the test fails
            try:
                urllib.request.urlopen(f"{base}/v1/models", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "server did not start"
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] == 5
        assert reply["usage"]["prompt_tokens"] > 5  # the chat format wrapped the message
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
