"""`gemma4-mlx serve` as a command: its help, one-line refusals before anything listens, and a
clean exit on SIGINT / SIGTERM in the middle of a generation."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from gemma4_mlx.checkpoint import write_random_checkpoint
from gemma4_mlx.commands import COMMAND_MODULES, app

for _name in COMMAND_MODULES:
    importlib.import_module(f"gemma4_mlx.commands.{_name}")

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("serve") / "tiny", dtype="float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_help_lists_the_server_options():
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0
    for option in ("--model", "--host", "--port", "--served-model-name", "--adapter-path", "--max-tokens",
                   "--max-tokens-limit", "--max-prompt-tokens", "--max-body-bytes", "--max-queue",
                   "--max-connections", "--timeout", "--temp", "--top-p", "--top-k", "--min-p",
                   "--prefill-step-size", "--strict-memory"):
        assert option in r.stdout, option


@pytest.mark.parametrize("args,word", [
    (["--port", "70000"], "--port"), (["--max-body-bytes", "0"], "--max-body-bytes"), (["--temp", "nan"], "temp"),
    (["--top-p", "0"], "top_p"), (["--timeout", "0"], "--timeout"), (["--max-tokens", "-5"], "--max-tokens"),
    (["--served-model-name", " "], "--served-model-name"),
])
def test_bad_options_are_one_line(tiny_path, args, word):
    r = runner.invoke(app, ["serve", "--model", str(tiny_path), *args])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0]


def _corrupt_weights(tiny_path, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_path, bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    return bad


def _bad_config(tiny_path, tmp_path):
    bad = tmp_path / "badconfig"
    shutil.copytree(tiny_path, bad)
    (bad / "config.json").write_text("{not json")
    return bad


def _bad_adapter(tiny_path, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"num_layers": 2, "lora_parameters": {
        "rank": 4, "scale": 1.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}))
    import mlx.core as mx

    mx.save_safetensors(str(adapter / "adapters.safetensors"),
                        {"model.layers.5.self_attn.q_proj.lora_a": mx.zeros((3, 3))})
    return adapter


@pytest.mark.parametrize("case", ["missing", "not-a-folder", "bad-config", "truncated-weights",
                                  "missing-adapter", "bad-adapter", "adapter-without-files"])
def test_unloadable_model_exits_before_listening(tiny_path, tmp_path, case):
    model, extra = str(tiny_path), []
    if case == "missing":
        model = str(tmp_path / "nope")
    elif case == "not-a-folder":
        (tmp_path / "file").write_text("x")
        model = str(tmp_path / "file")
    elif case == "bad-config":
        model = str(_bad_config(tiny_path, tmp_path))
    elif case == "truncated-weights":
        model = str(_corrupt_weights(tiny_path, tmp_path))
    elif case == "missing-adapter":
        extra = ["--adapter-path", str(tmp_path / "no-adapter")]
    elif case == "bad-adapter":
        extra = ["--adapter-path", str(_bad_adapter(tiny_path, tmp_path))]
    else:
        (tmp_path / "empty").mkdir()
        extra = ["--adapter-path", str(tmp_path / "empty")]
    port = _free_port()
    r = runner.invoke(app, ["serve", "--model", model, "--port", str(port), *extra])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output
    assert not _listening(port)


def test_port_in_use_is_one_line(tiny_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        r = runner.invoke(app, ["serve", "--model", str(tiny_path), "--port", str(s.getsockname()[1])])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on")


# -- signals (a real process) ------------------------------------------------------------------
def _start(tiny_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gemma4_mlx.cli", "serve", "--model", str(tiny_path), "--port", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    seen = b""
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen += line
        m = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: {seen.decode()[-2000:]}")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_signal_during_generation_exits_cleanly(tiny_path, sig, code):
    from gemma4_mlx.loading import load_tokenizer

    no_end = {str(i): -100 for i in load_tokenizer(tiny_path).eos_token_ids}
    proc, port = _start(tiny_path)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": 4000, "stream": True,
                           "logit_bias": no_end}).encode()
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while got.count(b"data: ") < 5:
            got += s.recv(65536)
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        rest = b""
        while True:  # the stream ends (closed), it does not hang
            b = s.recv(65536)
            if not b:
                break
            rest += b
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert rc == code, err
    assert "Traceback" not in err and "terminate called" not in err and "Abort" not in err, err
    assert "stopping" in err
