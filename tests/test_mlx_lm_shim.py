"""`gemma4-mlx mlx-lm <command>`: mlx-lm's own commands on this package's model.

The checkpoint here uses the per-layer config dialect, which mlx-lm's stock ``gemma4_text``
cannot load (it builds the wrong shapes): every command that works on it ran our model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlx.core as mx
import pytest

from gemma4_mlx.mlx_lm_shim import use_gemma4_mlx, run
from cli_harness import invoke as _cli


@pytest.fixture(scope="module")
def per_layer_ckpt(tmp_path_factory):
    from gemma4_mlx.checkpoint import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("shim") / "tiny", dtype="float32", seed=0,
                                   dialect="per_layer")




def test_loader_builds_our_model_only_inside_the_shim(per_layer_ckpt):
    import mlx_lm

    from gemma4_mlx import Model

    with pytest.raises(ValueError):  # stock cannot build this checkpoint
        mlx_lm.load(str(per_layer_ckpt))
    with use_gemma4_mlx():
        model, _ = mlx_lm.load(str(per_layer_ckpt))
        assert isinstance(model, Model)
    import mlx_lm.models.gemma4_text as stock

    assert stock.Model is not Model  # restored afterwards


def test_mlx_lm_generate(per_layer_ckpt, capsys, monkeypatch):
    """mlx-lm's generate on our model, its prompt written by Model.fill_cache inside the shim
    (gemma4_mlx.prompt_fill.in_mlx_lm): the same text as mlx-lm's own step gives outside it."""
    import sys

    import mlx_lm

    from gemma4_mlx import Model, load

    filled = []
    real = Model.fill_cache
    monkeypatch.setattr(Model, "fill_cache", lambda self, ids, cache: filled.append(ids.shape[1]) or real(self, ids, cache))
    stock_step = sys.modules["mlx_lm.generate"].generate_step
    run(["generate", "--model", str(per_layer_ckpt), "--prompt", "hello", "-m", "6", "--verbose", "False"])
    out = capsys.readouterr().out
    assert len(filled) == 1 and sys.modules["mlx_lm.generate"].generate_step is stock_step  # restored
    model, tok = load(per_layer_ckpt)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert filled == [len(prompt) - 1]
    assert out == mlx_lm.generate(model, tok, prompt, max_tokens=6) + "\n"
    assert filled == [len(prompt) - 1]  # outside the shim: mlx-lm's own step


def test_mlx_lm_lora_then_generate_fuse_and_cache_prompt(per_layer_ckpt, tmp_path, capsys):
    """mlx-lm trains a LoRA adapter on our model (2 iterations); our generate uses it; mlx-lm
    fuses it into a checkpoint our loader reads; mlx-lm's cache_prompt file continues in our
    generate."""
    from gemma4_mlx import load
    from gemma4_mlx.chat_format import encode_prompt
    from gemma4_mlx.generation import generate, load_with_adapters

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        rows = [{"text": f"The quick brown fox jumps over the lazy dog, {i} times."} for i in range(4)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = tmp_path / "adapters"
    run(["lora", "--model", str(per_layer_ckpt), "--train", "--data", str(data), "--iters", "2", "--batch-size", "2",
         "--num-layers", "2", "--adapter-path", str(adapters), "--steps-per-report", "1", "--val-batches", "1",
         "--steps-per-eval", "100", "--save-every", "100", "--max-seq-length", "64", "--learning-rate", "1e-2"])
    capsys.readouterr()
    assert (adapters / "adapters.safetensors").is_file() and (adapters / "adapter_config.json").is_file()

    model, tok = load_with_adapters(per_layer_ckpt, adapters)
    base, _ = load(per_layer_ckpt)
    ids = mx.array([encode_prompt(tok, "hello")])
    assert not mx.allclose(model(ids), base(ids), atol=1e-4)  # the trained adapter changed the model
    want = generate(model, tok, "hello", max_tokens=5).text
    r = _cli(["generate", "--model", str(per_layer_ckpt), "-p", "hello", "-m", "5", "--adapter-path", str(adapters)])
    assert r.exit_code == 0 and r.stdout == want + "\n", r.output

    fused = tmp_path / "fused"
    run(["fuse", "--model", str(per_layer_ckpt), "--adapter-path", str(adapters), "--save-path", str(fused)])
    capsys.readouterr()
    fused_model, _ = load(fused)
    assert mx.allclose(fused_model(ids), model(ids), atol=1e-4)

    cache_file = tmp_path / "prefix.safetensors"
    run(["cache_prompt", "--model", str(per_layer_ckpt), "--prompt", "Cached text.", "--prompt-cache-file",
         str(cache_file)])
    capsys.readouterr()
    r = _cli(["generate", "--prompt-cache-file", str(cache_file), "-p", " More.", "-m", "5"])
    assert r.exit_code == 0, r.output
    # the same as the whole prompt at once: mlx-lm's rendering of the cached part, ours of the rest
    head = tok.apply_chat_template([{"role": "user", "content": "Cached text."}], add_generation_prompt=False,
                                   continue_final_message=True)
    tail = encode_prompt(tok, " More.", after_cached_prefix=True)
    assert r.stdout == generate(base, tok, list(head) + tail, max_tokens=5).text + "\n"
    assert int(r.stderr.split("prompt: ")[1].split()[0]) == len(tail)
    other = _cli(["generate", "--model", str(fused), "--prompt-cache-file", str(cache_file), "-p", "x"])
    assert other.exit_code == 1 and "is not the model the prompt cache was made with" in other.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_answers_with_our_model(per_layer_ckpt):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma4_mlx.cli", "mlx-lm", "server", "--model",
                             str(per_layer_ckpt), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:  # bounded: the server starts within 90 s or the test fails
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "server did not start"
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=90).read())
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_shim_command_usage():
    r = _cli(["mlx-lm"])
    assert r.exit_code == 2 and "lora" in r.stdout and "server" in r.stdout
    r = _cli(["mlx-lm", "--model", "x"])
    assert r.exit_code == 2 and r.stderr.startswith("error: expected an mlx-lm command")
