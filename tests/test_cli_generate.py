"""`gemma4-mlx generate`, `chat` and `info` through typer's CliRunner on a tiny checkpoint."""

from __future__ import annotations

import importlib
import json

import pytest
from typer.testing import CliRunner

from gemma4_mlx.commands import COMMAND_MODULES, app
from test_generate import loaded, tiny_ckpt, tiny_plain_ckpt  # noqa: F401  (fixtures)

for _name in COMMAND_MODULES:
    importlib.import_module(f"gemma4_mlx.commands.{_name}")

runner = CliRunner()


def run(args, input=None):
    return runner.invoke(app, args, input=input)


# -- generate -------------------------------------------------------------------------------
def test_generate_streams_and_reports_stats(tiny_ckpt):
    r = run(["generate", "--model", str(tiny_ckpt), "--prompt", "hello", "--max-tokens", "5", "--greedy"])
    assert r.exit_code == 0, r.output
    assert "prompt:" in r.stderr and "tok/s" in r.stderr and "decode:" in r.stderr and "peak memory" in r.stderr
    assert "tok/s" not in r.stdout


def test_generate_matches_python_api(tiny_ckpt, loaded):  # noqa: F811
    from gemma4_mlx.generation import generate

    model, tok = loaded
    want = generate(model, tok, "hello", max_tokens=6, system="S").text
    r = run(["generate", "--model", str(tiny_ckpt), "-p", "hello", "-n", "6", "--system", "S"])
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"


def test_generate_prompt_from_stdin(tiny_ckpt):
    a = run(["generate", "--model", str(tiny_ckpt), "-n", "4", "--prompt", "-"], input="hello")
    b = run(["generate", "--model", str(tiny_ckpt), "-n", "4"], input="hello")
    c = run(["generate", "--model", str(tiny_ckpt), "-n", "4", "-p", "hello"])
    assert a.exit_code == b.exit_code == c.exit_code == 0
    assert a.stdout == b.stdout == c.stdout


def test_generate_seeded_sampling_is_reproducible(tiny_ckpt):
    args = ["generate", "--model", str(tiny_ckpt), "-p", "hello", "-n", "8", "--temp", "1.2", "--top-k", "50",
            "--top-p", "0.9", "--min-p", "0.01", "--seed", "11"]
    assert run(args).stdout == run(args).stdout


def test_generate_think_and_no_template_flags(tiny_ckpt):
    for extra in (["--think", "--show-thinking"], ["--no-chat-template"]):
        r = run(["generate", "--model", str(tiny_ckpt), "-p", "hello", "-n", "3"] + extra)
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args,msg", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--max-tokens", "-3"], "max_tokens"),
    (["--temp", "-0.5"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--min-p", "-0.1"], "min_p"),
    (["--min-p", "2"], "min_p"),
])
def test_generate_rejects_bad_settings(tiny_ckpt, args, msg):
    r = run(["generate", "--model", str(tiny_ckpt), "-p", "hi"] + args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0]
    assert "Traceback" not in r.output


def test_generate_rejects_empty_prompt(tiny_ckpt):
    for r in (run(["generate", "--model", str(tiny_ckpt), "-p", "  "]),
              run(["generate", "--model", str(tiny_ckpt), "-p", "-"], input="")):
        assert r.exit_code == 2 and r.stderr.strip() == "error: the prompt is empty"


def test_generate_past_max_positions_is_a_clear_error(tiny_ckpt, loaded):  # noqa: F811
    model, _ = loaded
    r = run(["generate", "--model", str(tiny_ckpt), "-p", "hi", "-n", str(model.args.max_position_embeddings)])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: prompt (") and "max_position_embeddings" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_generate_missing_model_is_one_line(tmp_path):
    r = run(["generate", "--model", str(tmp_path / "nope"), "-p", "hi"])
    assert r.exit_code == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


# -- chat -----------------------------------------------------------------------------------
def test_chat_scripted_session(tiny_ckpt, loaded):  # noqa: F811
    from gemma4_mlx.chat_format import encode_text, format_prompt, next_turn_text

    _, tok = loaded
    script = "hello\nhow are you?\n/reset\nhello\n/exit\nnever read\n"
    r = run(["chat", "--model", str(tiny_ckpt), "-n", "5", "--stats"], input=script)
    assert r.exit_code == 0, r.output
    assert "(conversation reset)" in r.stdout
    stats = [l for l in r.stderr.splitlines() if l.startswith("prompt:")]
    assert len(stats) == 3  # three replies, nothing after /exit
    n_prompt = [int(l.split()[1]) for l in stats]
    # turn 2 prefills only its own tokens; after /reset the first prompt is rendered again
    assert n_prompt[0] == len(encode_text(tok, format_prompt(tok, "hello")))
    assert n_prompt[1] in {len(encode_text(tok, next_turn_text("how are you?", closed))) for closed in (True, False)}
    assert n_prompt[2] == n_prompt[0]
    # the same greedy reply to the same first message, before and after /reset
    replies = [l for l in r.stdout.split(">> ") if l and "(conversation reset)" not in l]
    assert replies[0] == replies[2]


def test_chat_ends_at_eof_and_ignores_blank_lines(tiny_ckpt):
    r = run(["chat", "--model", str(tiny_ckpt), "-n", "3"], input="\n\nhi\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count(">> ") == 4


def test_chat_rejects_bad_settings(tiny_ckpt):
    r = run(["chat", "--model", str(tiny_ckpt), "--temp", "-1"], input="hi\n")
    assert r.exit_code == 2 and r.stderr.startswith("error: temperature")


# -- info -----------------------------------------------------------------------------------
def test_info_text(tiny_ckpt):
    r = run(["info", "--model", str(tiny_ckpt), "--layers"])
    assert r.exit_code == 0, r.output
    for key in ("layers:", "head dims:", "KV heads:", "KV sharing:", "parameters:", "quantization:", "weights:",
                "KV cache:", "memory estimate:", "plan:"):
        assert key in r.stdout, key


def test_info_json_matches_the_model(tiny_ckpt, loaded):  # noqa: F811
    from mlx.utils import tree_flatten

    model, _ = loaded
    r = run(["info", "--model", str(tiny_ckpt), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    plan = model.args.plan
    assert d["layers"] == len(plan)
    assert d["parameters"] == sum(v.size for _, v in tree_flatten(model.parameters()))
    assert d["kv_sharing"] == {str(p.index): p.kv_source for p in plan if p.is_kv_shared}
    assert d["head_dims"] == sorted({p.head_dim for p in plan})
    assert d["weights"]["bytes"] == sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    # one cache entry per non-shared layer: sliding layers stop at the window
    want = 0
    for p in plan:
        if p.cache_index is not None:
            t = min(1000, model.args.sliding_window) if p.is_sliding else 1000
            want += 2 * t * p.num_kv_heads * p.head_dim * 4  # float32 checkpoint
    assert d["kv_cache_bytes_per_1k_tokens"] == want


def test_info_needs_no_weights(tiny_ckpt, tmp_path):
    (tmp_path / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    r = run(["info", "--model", str(tmp_path)])
    assert r.exit_code == 0 and "weights:          unavailable" in r.stdout


def test_info_bad_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    r = run(["info", "--model", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


# -- help -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["generate", "chat", "info", "serve"])
def test_help(cmd):
    r = run([cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.stdout
    if cmd != "serve":  # serve passes its options through to mlx_lm.server (--help-server)
        assert "--model" in r.stdout


def test_generate_ctrl_c_stops_cleanly(tiny_ckpt, monkeypatch):  # noqa: F811
    import gemma4_mlx.generation as generation

    real = generation.stream_generate

    def interrupted(*args, **kwargs):
        for i, r in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield r

    monkeypatch.setattr(generation, "stream_generate", interrupted)
    r = run(["generate", "--model", str(tiny_ckpt), "--prompt", "hello", "--max-tokens", "20", "--greedy"])
    assert r.exit_code == 130
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr + r.stdout
