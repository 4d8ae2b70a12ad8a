"""Speculative decoding gives plain greedy decoding's tokens, past the sliding window too: ours
and mlx-lm's step on our caches, with model drafters and Gemma 4's MTP drafter (checked against
transformers' implementation), through the Python API, ChatSession and the CLI."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from gemma4_mlx import Model, parse_config
from gemma4_mlx.assistant import load_assistant, random_assistant_config, write_random_assistant
from gemma4_mlx.presets import preset_config
from gemma4_mlx.speculative import load_draft_model, speculative_generate_step
from test_generate import loaded, tiny_ckpt  # noqa: F401  (fixtures)

WINDOW = 8  # the tiny preset's sliding window


def _random_model(seed=0, noise_of=None, noise=0.0):
    model = Model(parse_config(preset_config("tiny")))
    mx.random.seed(seed)
    if noise_of is None:
        model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0),
                              model.parameters()))
    else:  # a perturbed copy: agrees with the original on some tokens only
        model.update(tree_map(lambda p: p + noise * mx.random.normal(p.shape) * mx.abs(p).mean(),
                              noise_of.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def target():
    return _random_model(0)


@pytest.fixture(scope="module")
def drafters(target):
    return {"self": target, "perturbed": _random_model(3, noise_of=target, noise=0.1), "other": _random_model(7)}


def plain_greedy(model, prompt, n):
    cache = model.make_cache()
    y = mx.argmax(model(mx.array(prompt)[None], cache=cache)[:, -1], -1)
    out = []
    for _ in range(n):
        out.append(y.item())
        y = mx.argmax(model(y[None], cache=cache)[:, -1], -1)
    return out


def _prompt(n, seed=0):
    return np.random.default_rng(seed + n).integers(0, 512, size=n).tolist()


@pytest.mark.parametrize("prompt_len", [3, WINDOW, 5 * WINDOW])
@pytest.mark.parametrize("k", [1, 4])
def test_drafted_greedy_equals_plain_greedy(target, drafters, prompt_len, k):
    prompt = _prompt(prompt_len)
    n = 40  # several windows past the prompt
    want = plain_greedy(target, prompt, n)
    accepted = {}
    for name, draft in drafters.items():
        out = list(speculative_generate_step(mx.array(prompt), target, draft, num_draft_tokens=k, max_tokens=n))
        assert [t for t, _, _ in out] == want, name
        accepted[name] = sum(d for _, _, d in out)
    rounds = -(-n // (k + 1))
    assert accepted["self"] == n - rounds  # the target drafting for itself: every proposal kept
    assert 0 < accepted["perturbed"] < accepted["self"]  # some kept, some taken back
    assert accepted["other"] < accepted["perturbed"]


def test_logprobs_and_sampling_follow_the_target(target, drafters):
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    prompt = _prompt(20)
    procs = make_logits_processors(repetition_penalty=1.3)
    mx.random.seed(5)
    out = list(speculative_generate_step(mx.array(prompt), target, drafters["perturbed"], num_draft_tokens=3,
                                         max_tokens=30, logits_processors=procs))
    # greedy with a repetition penalty: mlx-lm's own plain step gives the same tokens
    from mlx_lm.generate import generate_step

    ref = [t for t, _ in generate_step(mx.array(prompt), target, max_tokens=30, logits_processors=procs,
                                       prompt_cache=target.make_cache())]
    assert [t for t, _, _ in out] == ref
    lp = out[0][1]
    assert lp.shape == (target.args.vocab_size,) and abs(float(mx.logsumexp(lp))) < 1e-4
    # sampling at a temperature runs and yields tokens from the vocabulary
    sampled = list(speculative_generate_step(mx.array(prompt), target, target, num_draft_tokens=2, max_tokens=10,
                                             sampler=make_sampler(0.8)))
    assert len(sampled) == 10 and all(0 <= t < 512 for t, _, _ in sampled)


def test_mlx_lm_speculative_functions_run_the_exact_step(target, drafters, tiny_ckpt):  # noqa: F811
    """mlx-lm's speculative_generate_step (what its stream_generate and server call) runs ours
    for our model: exact past the window, with default caches or an explicit target + draft
    prompt_cache (one entry per layer), any number of draft tokens; other models keep mlx-lm's."""
    import sys

    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    mlx_step = sys.modules["mlx_lm.generate"].speculative_generate_step
    draft = drafters["perturbed"]
    for prompt_len in (3, 5 * WINDOW):
        prompt = _prompt(prompt_len, seed=1)
        want = plain_greedy(target, prompt, 32)
        for k in (2, 5):
            out = list(mlx_step(mx.array(prompt), target, draft, num_draft_tokens=k, max_tokens=32))
            assert [t for t, _, _ in out] == want
        cache = make_prompt_cache(target) + make_prompt_cache(draft)  # as mlx-lm's server makes it
        out = list(mlx_step(mx.array(prompt), target, draft, num_draft_tokens=4, max_tokens=32, prompt_cache=cache))
        assert [t for t, _, _ in out] == want and cache[0].offset == prompt_len + 32
    # the MTP drafter through mlx_lm.generate
    from gemma4_mlx import load

    model, tok = load(tiny_ckpt)
    ids = _prompt(30, seed=5)
    assistant = write_random_assistant(random_assistant_config(model.args, layers=1, hidden_size=32, ordered=False),
                                       tiny_ckpt.parent / "assistant-for-mlx-lm")
    assert mlx_lm.generate(model, tok, ids, max_tokens=16) == mlx_lm.generate(
        model, tok, ids, max_tokens=16, draft_model=load_draft_model(assistant), num_draft_tokens=3)
    # a stock mlx-lm model still gets mlx-lm's own step
    from mlx_lm.models import llama

    stock = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2,
                                        intermediate_size=64, num_attention_heads=4, rms_norm_eps=1e-5,
                                        vocab_size=64, num_key_value_heads=2))
    mx.eval(stock.parameters())
    out = list(mlx_step(mx.array([1, 2, 3]), stock, stock, num_draft_tokens=2, max_tokens=6))
    assert len(out) == 6 and mlx_step.stock is not mlx_step


def test_stopping_early_leaves_the_cache_with_every_yielded_token(target, drafters):
    """Like mlx-lm's generate_step: closed by the consumer or at max_tokens, the cache holds the
    prompt and every token yielded (so a conversation can go on from it)."""
    prompt = _prompt(30)
    want = plain_greedy(target, prompt, 20)
    for n in (1, 6, 13):
        for closed in (True, False):
            cache = target.make_cache()
            steps = speculative_generate_step(mx.array(prompt), target, drafters["perturbed"], num_draft_tokens=4,
                                              max_tokens=100 if closed else n, prompt_cache=cache)
            got = [next(steps)[0] for _ in range(n)]
            if closed:
                steps.close()
            else:
                assert next(steps, None) is None
            assert got == want[:n] and cache[0].offset == len(prompt) + n
            cache[0].trim(1)  # recompute the last position: its logits give plain greedy's next token
            for c in cache[1:]:
                c.trim(1)
            assert mx.argmax(target(mx.array([[got[-1]]]), cache=cache)[:, -1], -1).item() == want[n]


# -- Gemma 4's MTP drafter ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def assistant_ckpts(tmp_path_factory, target):
    root = tmp_path_factory.mktemp("assistant")
    ordered = random_assistant_config(target.args, layers=2, hidden_size=32, num_centroids=16, top_k=4)
    dense = random_assistant_config(target.args, layers=3, hidden_size=32, ordered=False)
    return {"ordered": write_random_assistant(ordered, root / "ordered", seed=1),
            "dense": write_random_assistant(dense, root / "dense", seed=2)}


def _copying_assistant(path, target):
    """The dense drafter rewired to propose its input token again (pass-through layers, the
    target's embedding as its head): it agrees with the target on repeats, not elsewhere."""
    a = load_assistant(path)
    ha, ht = a.args.text.hidden_size, target.args.hidden_size
    pre = mx.zeros((ha, 2 * ht))
    pre[:, :ha] = mx.eye(ha)
    weights = {"pre_projection.weight": pre, "model.embed_tokens.weight": target.model.embed_tokens.weight[:, :ha] * 10}
    for i, layer in enumerate(a.model.layers):
        weights[f"model.layers.{i}.self_attn.o_proj.weight"] = mx.zeros_like(layer.self_attn.o_proj.weight)
        weights[f"model.layers.{i}.mlp.down_proj.weight"] = mx.zeros_like(layer.mlp.down_proj.weight)
    a.load_weights(list(weights.items()), strict=False)
    return a


@pytest.mark.parametrize("prompt_len", [1, WINDOW, 5 * WINDOW])
def test_mtp_drafter_greedy_equals_plain_greedy(target, assistant_ckpts, prompt_len):
    prompt = _prompt(prompt_len, seed=3)
    want = plain_greedy(target, prompt, 32)
    drafters = {name: load_draft_model(p) for name, p in assistant_ckpts.items()}
    drafters["copying"] = _copying_assistant(assistant_ckpts["dense"], target)
    kept = 0
    for name, draft in drafters.items():
        for k in ((2, 5) if name != "copying" else (3,)):
            out = list(speculative_generate_step(mx.array(prompt), target, draft, num_draft_tokens=k, max_tokens=32))
            assert [t for t, _, _ in out] == want, (name, k)
            kept += sum(d for _, _, d in out) if name == "copying" else 0
    if prompt_len == WINDOW:
        assert kept > 0  # the copying drafter's proposals are kept on repeats


@pytest.mark.reference
def test_mtp_drafter_matches_transformers(target, assistant_ckpts):
    """Our drafter's first proposal, reading the target's ring caches, equals transformers'
    Gemma4AssistantForCausalLM fed the target's full-length shared KV (its own window masks)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mlx_lm.models.cache import KVCache

    from gemma4_mlx.assistant import target_contexts
    from gemma4_mlx.cache import SharedLayerCache

    args = target.args
    prompt = mx.array([_prompt(5 * WINDOW, seed=4)])
    p = prompt.shape[1] - 1  # the drafted-from token's position
    rings = target.make_cache(num_draft_tokens=5)
    _, hidden = target(prompt[:, :p], cache=rings, return_hidden=True)
    full = [KVCache() for _ in range(args.num_caches)] + [SharedLayerCache()] * (args.num_hidden_layers - args.num_caches)
    target(prompt[:, :p], cache=full)
    embed = target.model.embed_tokens(prompt[:, p:]) * (args.hidden_size**0.5)
    inputs = mx.concatenate([embed, hidden[:, -1:]], axis=-1)
    shared = {}
    for t in ("sliding_attention", "full_attention"):
        producer = [q for q in args.plan if q.layer_type == t and not q.is_kv_shared][-1]
        c = full[producer.cache_index]
        shared[t] = tuple(torch.tensor(np.array(x[..., :p, :])) for x in (c.keys, c.values))
    for name, path in assistant_ckpts.items():
        ours = load_assistant(path)
        h, logits = ours(inputs, target_contexts(args, rings, p, ours.args.text.sliding_window), p)
        ref = transformers.Gemma4AssistantForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            out = ref(inputs_embeds=torch.tensor(np.array(inputs)), position_ids=torch.tensor([[p]]),
                      shared_kv_states=shared)
        np.testing.assert_allclose(np.array(h), out.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(logits), out.logits.numpy(), rtol=1e-4, atol=1e-4)


def test_assistant_checkpoint_errors(tmp_path, target, assistant_ckpts):
    import json
    import shutil

    from gemma4_mlx.loading import LoadError
    from gemma4_mlx.speculative import AssistantDrafter

    bad = tmp_path / "bad"
    shutil.copytree(assistant_ckpts["dense"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["num_kv_shared_layers"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="num_kv_shared_layers"):
        load_draft_model(bad)
    other = Model(parse_config(dict(preset_config("tiny"), hidden_size=96)))
    with pytest.raises(ValueError, match="hidden size"):
        AssistantDrafter(load_assistant(assistant_ckpts["dense"]), other)


# -- through the API, ChatSession and the CLI -----------------------------------------------------
def test_generate_api_and_chat_session_with_a_draft_model(loaded, tiny_ckpt):  # noqa: F811
    from gemma4_mlx.generation import ChatSession, generate, stream_generate

    model, tok = loaded
    prompt = "tell me a long story about windows"
    plain = generate(model, tok, prompt, max_tokens=40)
    drafted = list(stream_generate(model, tok, prompt, max_tokens=40, draft_model=str(tiny_ckpt),
                                   num_draft_tokens=3))
    assert [r.token for r in drafted] == plain.tokens[: len(drafted)] and len(drafted) == len(plain.tokens)
    assert any(r.from_draft for r in drafted) and not drafted[-1].from_draft
    a = ChatSession(model, tok, max_tokens=24)
    b = ChatSession(model, tok, max_tokens=24, draft_model=model, num_draft_tokens=2)
    for msg in ("hi", "and then what happened next", "go on"):
        assert [r.token for r in a.send(msg)] == [r.token for r in b.send(msg)]
        assert a.cached_tokens == b.cached_tokens == b.draft_cache[0].offset
    assert a.cached_tokens > 3 * WINDOW


def test_cli_draft_model_flags(tiny_ckpt, assistant_ckpts, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from gemma4_mlx.commands import COMMAND_MODULES, app

    for name in COMMAND_MODULES:
        importlib.import_module(f"gemma4_mlx.commands.{name}")
    run = CliRunner().invoke
    base = ["generate", "--model", str(tiny_ckpt), "-p", "hello", "-n", "20", "--greedy"]
    plain = run(app, base)
    assert plain.exit_code == 0, plain.output
    for draft in (str(tiny_ckpt), str(assistant_ckpts["ordered"])):
        r = run(app, base + ["--draft-model", draft, "--num-draft-tokens", "4"])
        assert r.exit_code == 0, r.output
        assert r.stdout == plain.stdout
    r = run(app, base + ["--draft-model", str(tiny_ckpt), "--num-draft-tokens", "0"])
    assert r.exit_code == 2 and "--num-draft-tokens" in r.stderr
    wrong = write_random_assistant(random_assistant_config(
        parse_config(dict(preset_config("tiny"), vocab_size=256)), layers=1, hidden_size=32, ordered=False),
        tmp_path / "wrong")
    r = run(app, base + ["--draft-model", str(wrong)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "vocabulary" in r.stderr
    chat = run(app, ["chat", "--model", str(tiny_ckpt), "-n", "8", "--draft-model", str(tiny_ckpt)], input="hi\nmore\n")
    assert chat.exit_code == 0, chat.output


@pytest.mark.parametrize("switch", ["auto", "0"])
def test_the_targets_prompt_is_filled_where_no_drafter_reads_its_hidden_states(target, drafters, assistant_ckpts,
                                                                               monkeypatch, switch):
    """A model drafter: the target's prompt chunks, and what the draft model is fed (the prompt, and
    the tokens that bring it level at the end), go through Model.fill_cache (gemma4_mlx.prompt_fill),
    unless switched off; an MTP drafter reads the target's hidden states, so its prompt is called.
    The tokens are plain greedy's either way."""
    from gemma4_mlx import prompt_fill

    monkeypatch.setenv(prompt_fill.PROMPT_FILL_ENV, switch)
    filled = []
    draft = drafters["perturbed"]
    real = type(target).fill_cache
    monkeypatch.setattr(type(target), "fill_cache", lambda self, inputs, cache: filled.append(
        ("target" if self is target else "draft", int(inputs.shape[1]))) or real(self, inputs, cache))
    prompt = _prompt(3 * WINDOW)
    want = plain_greedy(target, prompt, 12)
    out = list(speculative_generate_step(mx.array(prompt), target, draft, num_draft_tokens=3,
                                         max_tokens=12, prefill_step_size=10))
    assert [t for t, _, _ in out] == want
    if switch == "auto":
        assert [n for who, n in filled if who == "target"] == [10, 10, 3]
        assert [n for who, n in filled if who == "draft"][:3] == [10, 10, 3]
    else:
        assert filled == []
    filled.clear()
    mtp = load_draft_model(assistant_ckpts["dense"])
    out = list(speculative_generate_step(mx.array(prompt), target, mtp, num_draft_tokens=3, max_tokens=12,
                                         prefill_step_size=10))
    assert [t for t, _, _ in out] == want and filled == []
