"""`gemma4-mlx serve --draft-model`: every request decoded with the exact speculative step, greedy
replies equal to those of a server without a drafter (the target as its own drafter, and Gemma 4's
MTP drafter), the drafter loaded once at start and checked there (one line, exit 1, nothing
listens), and requests never choosing one."""

from __future__ import annotations

import json

import pytest
from serve_harness import no_end_bias, serving, wait_for
from test_serve_cli import _free_port, _listening, runner
from test_serve_limits import _stream_until_tokens

from gemma4_mlx import parse_config
from gemma4_mlx.assistant import random_assistant_config, write_random_assistant
from gemma4_mlx.checkpoint import write_random_checkpoint
from gemma4_mlx.commands import app
from gemma4_mlx.presets import preset_config
from gemma4_mlx.server import model_loader

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
WINDOW = 8  # the tiny preset's sliding window: every prompt here is past it


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("serve") / "tiny", dtype="float32")


@pytest.fixture(scope="module")
def mtp_path(tiny_path, tmp_path_factory):
    args = parse_config(json.loads((tiny_path / "config.json").read_text()))
    return write_random_assistant(random_assistant_config(args, layers=2, hidden_size=32, ordered=False),
                                  tmp_path_factory.mktemp("mtp") / "mtp", seed=1)


def _requests(tok):
    bias = no_end_bias(tok)
    story = "Tell me a long story about windows, doors and the people who open them every day."
    return [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "logit_bias": bias}),
        (CHAT, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": story}],
                "max_tokens": 40, "logit_bias": bias, "logprobs": True}),
        (COMPLETIONS, {"prompt": story, "max_tokens": 30, "logit_bias": bias}),
        (CHAT, {"messages": [{"role": "user", "content": story}], "max_tokens": 16, "stream": True}),
    ]


def _replies(client, requests):
    out = []
    for path, body in requests:
        r = client.post(path, body)
        assert r.status == 200, r.body
        if body.get("stream"):
            events = r.events()[:-1]
            out.append(("".join(c["choices"][0]["delta"].get("content", "") for c in events),
                        [c["choices"][0]["finish_reason"] for c in events if c["choices"][0]["finish_reason"]]))
            continue
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if path == CHAT else choice["text"]
        tokens = [e["token"] for e in choice["logprobs"]["content"]] if body.get("logprobs") else None
        out.append((text, choice["finish_reason"], r.json()["usage"], tokens))
    return out


def test_greedy_replies_equal_the_plain_servers(tiny_path, mtp_path):
    with serving(model_loader(str(tiny_path))) as plain:
        requests = _requests(plain.app.tokenizer)
        want = _replies(plain.client, requests)
    for drafter, k in ((tiny_path, 3), (mtp_path, 2)):
        with serving(model_loader(str(tiny_path), draft_model=str(drafter)), num_draft_tokens=k) as s:
            assert s.app.worker.draft_model is not None and s.app.worker.num_draft_tokens == k
            drafted = 0
            got = []
            for request in requests:
                got += _replies(s.client, [request])
                drafted += s.app.worker.last_job.drafted
            assert got == want, drafter
            if drafter == tiny_path:
                # the target drafting for itself: every proposal is kept (the speculative step ran)
                assert drafted >= sum(b["max_tokens"] for _, b in requests) // 2
            # sampling works through the speculative step too (and a seed repeats it)
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 1.0,
                    "seed": 7, "logit_bias": no_end_bias(s.app.tokenizer)}
            a, b = s.client.post(CHAT, body).json(), s.client.post(CHAT, body).json()
            assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
            # requests never choose a drafter
            r = s.client.post(CHAT, dict(body, draft_model=str(tiny_path)))
            assert r.status == 400 and r.json()["error"]["param"] == "draft_model"
            # a client that leaves cancels its drafted generation, and the server goes on
            done = s.app.worker.completed
            _stream_until_tokens(s, s.app.tokenizer).close()
            assert wait_for(lambda: s.app.worker.completed == done + 1, timeout=10)
            assert s.app.worker.last_job.outcome == "cancelled"
            s.client.healthy_and_answering()


def test_help_lists_the_draft_flags():
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--draft-model" in r.stdout and "--num-draft-tokens" in r.stdout


def _wrong_vocabulary(tmp_path):
    args = parse_config(dict(preset_config("tiny"), vocab_size=256))
    return write_random_assistant(random_assistant_config(args, layers=1, hidden_size=32, ordered=False),
                                  tmp_path / "wrong")


def _wrong_size(tmp_path):
    args = parse_config(dict(preset_config("tiny"), hidden_size=96))
    return write_random_assistant(random_assistant_config(args, layers=1, hidden_size=32, ordered=False),
                                  tmp_path / "wrong-size")


@pytest.mark.parametrize("case,word", [("missing", "no such folder"), ("wrong-vocabulary", "vocabulary"),
                                       ("wrong-size", "hidden size")])
def test_bad_drafter_exits_before_listening(tiny_path, tmp_path, case, word):
    draft = {"missing": lambda: tmp_path / "nope", "wrong-vocabulary": lambda: _wrong_vocabulary(tmp_path),
             "wrong-size": lambda: _wrong_size(tmp_path)}[case]()
    port = _free_port()
    r = runner.invoke(app, ["serve", "--model", str(tiny_path), "--port", str(port), "--draft-model", str(draft)])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --draft-model") and word in lines[0], r.stderr
    assert lines[0].count(str(draft)) == 1
    assert not _listening(port)


@pytest.mark.parametrize("args,word", [(["--num-draft-tokens", "0"], "--num-draft-tokens"),
                                       (["--num-draft-tokens", "2"], "--draft-model")])
def test_bad_draft_options_are_usage_errors(tiny_path, args, word):
    extra = ["--draft-model", str(tiny_path)] if args[1] == "0" else []
    r = runner.invoke(app, ["serve", "--model", str(tiny_path), *extra, *args])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0]
