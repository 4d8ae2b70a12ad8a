"""Generation on a tiny random checkpoint: our API, mlx-lm's APIs, stop ids, chat KV reuse, server loader."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from gemma4_mlx.chat_format import encode_text, next_turn_text


# -- fixtures (imported by the other generation test files) -----------------------------------
@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from gemma4_mlx.checkpoint import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("gen") / "tiny", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def tiny_plain_ckpt(tmp_path_factory):
    """The same checkpoint without a chat template (Gemma 4's built-in format is used)."""
    from gemma4_mlx.checkpoint import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("gen") / "plain", dtype="float32", seed=0,
                                   chat_template=False)


@pytest.fixture(scope="session")
def loaded(tiny_ckpt):
    from gemma4_mlx import load

    return load(tiny_ckpt)


class Scripted:
    """Wraps a model: suppresses ``banned`` ids, and forces ``script[k]`` as the k-th generated token.

    Also counts the tokens the model is fed (``fed`` per call), to prove what is prefilled.
    """

    def __init__(self, model, banned=(), script=None):
        self.model = model
        self.args = model.args
        self.banned = list(banned)
        self.script = dict(script or {})
        self.fed = []
        self.start = None

    def make_cache(self):
        return self.model.make_cache()

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, inputs, cache=None, **kw):
        offset = cache[0].offset if cache else 0
        self.fed.append(int(inputs.shape[1]))
        logits = self.model(inputs, cache=cache, **kw)
        vocab = logits.shape[-1]
        bias = mx.zeros((vocab,))
        if self.banned:
            bias[mx.array(self.banned)] = -1e9
        if self.start is not None:
            k = offset + inputs.shape[1] - self.start  # index of the token these logits produce
            if k in self.script:
                bias = mx.where(mx.arange(vocab) == self.script[k], 1e9, bias)
        return logits + bias


def _ends(model, tok):
    from gemma4_mlx.generation import end_token_ids

    return sorted(end_token_ids(model, tok))


# -- our API --------------------------------------------------------------------------------
def test_generate_length_and_stream_fields(loaded):
    import gemma4_mlx

    model, tok = loaded
    wrapped = Scripted(model, banned=_ends(model, tok))
    res = gemma4_mlx.generate(wrapped, tok, "hello", max_tokens=7)
    assert res.finish_reason == "length" and len(res.tokens) == 7 and res.generation_tokens == 7
    steps = list(gemma4_mlx.stream_generate(wrapped, tok, "hello", max_tokens=7))
    assert [s.token for s in steps] == res.tokens
    assert [s.finish_reason for s in steps] == [None] * 6 + ["length"]
    assert all(s.token_time > 0 for s in steps) and steps[-1].peak_memory > 0
    assert "".join(s.text for s in steps) == res.text


def test_all_end_ids_declared(loaded):
    model, tok = loaded
    vocab = tok.get_vocab()
    ends = _ends(model, tok)
    assert vocab["<turn|>"] in ends and vocab["<eos>"] in ends
    assert set(model.args.eos_token_id) <= set(ends)


@pytest.mark.parametrize("which", ["<turn|>", "<eos>"])
def test_stops_at_first_end_id(loaded, which):
    from gemma4_mlx.generation import generate

    model, tok = loaded
    ends = _ends(model, tok)
    end = tok.get_vocab()[which]
    other = [e for e in ends if e != end][0]
    prompt = encode_text(tok, "<bos><|turn>user\nhi<turn|>\n<|turn>model\n")
    # control: with every end id banned the run goes to max_tokens
    base = Scripted(model, banned=ends)
    base.start = len(prompt)
    assert generate(base, tok, prompt, max_tokens=10).finish_reason == "length"
    # forced end id at step 4 (and another at 6): stops at the first, emits nothing of it
    w = Scripted(model, banned=ends, script={4: end, 6: other})
    w.start = len(prompt)
    res = generate(w, tok, prompt, max_tokens=10)
    assert res.finish_reason == "stop"
    assert len(res.tokens) == 4 and res.generation_tokens == 5
    assert end not in res.tokens
    assert which not in res.text and "<turn|>" not in res.text and "<eos>" not in res.text


def test_generation_config_end_id_is_honoured(tiny_ckpt, tmp_path):
    from gemma4_mlx import load
    from gemma4_mlx.generation import generate

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    gen_cfg = json.loads((ck / "generation_config.json").read_text())
    extra = 7  # any ordinary id becomes an end id when generation_config declares it
    assert extra not in gen_cfg["eos_token_id"]
    gen_cfg["eos_token_id"] = list(gen_cfg["eos_token_id"]) + [extra]
    (ck / "generation_config.json").write_text(json.dumps(gen_cfg))
    model, tok = load(ck)
    prompt = encode_text(tok, "<bos>hi")
    w = Scripted(model, banned=[e for e in _ends(model, tok) if e != extra] + [extra], script={2: extra})
    w.start = len(prompt)
    res = generate(w, tok, prompt, max_tokens=8)
    assert res.finish_reason == "stop" and len(res.tokens) == 2


def test_reasoning_separated_end_to_end(loaded):
    from gemma4_mlx.generation import generate, stream_generate

    model, tok = loaded
    out = "<|channel>thought\nplan it<channel|>The answer"
    ids = encode_text(tok, out)
    end = tok.get_vocab()["<turn|>"]
    prompt = encode_text(tok, "<bos><|turn>user\nq<turn|>\n<|turn>model\n")
    script = {i: t for i, t in enumerate(ids)}
    script[len(ids)] = end
    w = Scripted(model, script=script)
    w.start = len(prompt)
    res = generate(w, tok, prompt, max_tokens=100)
    assert res.finish_reason == "stop"
    assert res.reasoning == "plan it" and res.text == "The answer"
    w2 = Scripted(model, script=script)
    w2.start = len(prompt)
    steps = list(stream_generate(w2, tok, prompt, max_tokens=100))
    assert "".join(s.raw for s in steps) == out
    assert "".join(s.text for s in steps) == "The answer"


def test_sampler_seed_determinism(loaded):
    from gemma4_mlx.generation import generate

    model, tok = loaded
    a = generate(model, tok, "hello", max_tokens=12, temp=1.5, seed=3).tokens
    b = generate(model, tok, "hello", max_tokens=12, temp=1.5, seed=3).tokens
    assert a == b
    others = [generate(model, tok, "hello", max_tokens=12, temp=1.5, seed=s).tokens for s in (4, 5, 6)]
    assert any(o != a for o in others)


def test_invalid_sampling_raises(loaded):
    from gemma4_mlx.generation import generate

    model, tok = loaded
    for kw in ({"temp": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"min_p": 1.5}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            generate(model, tok, "hello", **kw)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [], max_tokens=3)


def test_context_limit_checked_before_generating(loaded):
    from gemma4_mlx.generation import generate

    model, tok = loaded
    limit = model.args.max_position_embeddings
    w = Scripted(model)
    prompt = encode_text(tok, "<bos>hi")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(w, tok, prompt, max_tokens=limit - len(prompt) + 1)
    assert w.fed == []  # the model never ran


def test_chat_template_and_builtin_format_agree(tiny_ckpt, tiny_plain_ckpt):
    from gemma4_mlx.chat_format import format_prompt, has_chat_template
    from gemma4_mlx.loading import load_tokenizer

    t1 = load_tokenizer(tiny_ckpt)
    t2 = load_tokenizer(tiny_plain_ckpt)
    assert has_chat_template(t1) and not has_chat_template(t2)
    for kw in ({}, {"system": "Be brief."}, {"think": True}, {"system": "S", "think": True}):
        assert format_prompt(t1, "hi there", **kw) == format_prompt(t2, "hi there", **kw)


# -- mlx-lm's own APIs with our model -------------------------------------------------------
@pytest.mark.parametrize("compiled", ["1", "0"])  # the compiled step is the GPU default, eager the CPU one
def test_mlx_lm_generate_and_stream_generate(loaded, compiled, monkeypatch):
    import mlx_lm

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", compiled)

    from gemma4_mlx.generation import generate

    model, tok = loaded
    prompt = encode_text(tok, "<bos><|turn>user\nhello<turn|>\n<|turn>model\n")
    text = mlx_lm.generate(model, tok, prompt, max_tokens=8)
    assert isinstance(text, str)
    theirs = [r.token for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=8)]
    ours = generate(model, tok, prompt, max_tokens=8)
    n = len(ours.tokens)
    assert theirs[:n] == ours.tokens[:len(theirs)]


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_mlx_lm_batch_generate_matches_single(loaded, compiled, monkeypatch):
    import mlx_lm
    from mlx_lm.generate import generate_step

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", compiled)

    model, tok = loaded
    p1 = encode_text(tok, "<bos>hi")
    p2 = encode_text(tok, "<bos>a much longer prompt, longer than the sliding window")
    assert len(p1) != len(p2) and len(p2) > model.args.sliding_window
    ends = _ends(model, tok)
    out = mlx_lm.batch_generate(model, tok, [p1, p2], max_tokens=10, return_token_ids=True)
    for p, got in zip((p1, p2), out.token_ids):
        single = []
        for t, _ in generate_step(mx.array(p), model, max_tokens=10):
            if t in ends:
                break
            single.append(t)
        assert got == single


# -- chat sessions ---------------------------------------------------------------------------
def test_chat_session_reuses_kv_cache(loaded):
    from gemma4_mlx.generation import ChatSession, generate

    model, tok = loaded
    w = Scripted(model)
    s = ChatSession(w, tok, max_tokens=6)
    r1 = list(s.send("hello"))
    first_prompt = s.last_prefill_tokens
    cached = s.cached_tokens
    n1 = r1[-1].generation_tokens
    assert cached == first_prompt + n1  # prompt + every generated token (end id included)
    w.fed.clear()
    r2 = list(s.send("and now?"))
    closed = r1[-1].finish_reason == "stop" and r1[-1].token == tok.get_vocab()["<turn|>"]
    new_turn = encode_text(tok, next_turn_text("and now?", closed))
    # only the new turn is prefilled (mlx-lm feeds its last token with the first decode step),
    # then one token per step
    assert s.last_prefill_tokens == len(new_turn)
    assert w.fed[0] == len(new_turn) - 1 and all(n == 1 for n in w.fed[1:])
    assert s.cached_tokens == cached + len(new_turn) + r2[-1].generation_tokens
    # the reply equals a fresh run over the whole token sequence
    seq = encode_text(tok, "<bos><|turn>user\nhello<turn|>\n<|turn>model\n")
    seq += [r.token for r in r1] + new_turn
    fresh = generate(model, tok, seq, max_tokens=6)
    assert [r.token for r in r2][: len(fresh.tokens)] == fresh.tokens


def test_chat_session_interrupt_and_reset(loaded):
    from gemma4_mlx.generation import ChatSession

    model, tok = loaded
    w = Scripted(model)
    s = ChatSession(w, tok, max_tokens=8)
    list(s.send("first"))
    it = s.send("second")
    next(it)
    it.close()  # like Ctrl-C in the CLI: the turn is dropped, the session stays usable
    assert s.cache is None and [m["role"] for m in s.messages] == ["user", "assistant"]
    w.fed.clear()
    r = list(s.send("third"))
    assert r[-1].finish_reason is not None
    # the whole history is prefilled again
    assert w.fed[0] + 1 == s.last_prefill_tokens > len(encode_text(tok, next_turn_text("third", True)))
    s.reset()
    assert s.messages == [] and s.cache is None


def test_chat_session_turn_interrupted_by_keyboard(loaded):
    from gemma4_mlx.generation import ChatSession

    model, tok = loaded

    class Boom(Scripted):
        calls = 0

        def __call__(self, inputs, cache=None, **kw):
            Boom.calls += 1
            if Boom.calls == 3:
                raise KeyboardInterrupt
            return super().__call__(inputs, cache=cache, **kw)

    s = ChatSession(Boom(model), tok, max_tokens=8)
    with pytest.raises(KeyboardInterrupt):
        list(s.send("first"))
    assert s.messages == [] and s.cache is None
    assert list(s.send("again"))[-1].finish_reason is not None


def test_package_reexports_generate_in_a_fresh_interpreter():
    """``from gemma4_mlx import generate, stream_generate`` (the documented API) before anything
    imported anything else: the package exports the functions."""
    import subprocess
    import sys

    code = ("import gemma4_mlx\n"
            "from gemma4_mlx import generate, stream_generate\n"
            "assert callable(generate) and callable(stream_generate)\n"
            "assert gemma4_mlx.generate is generate and generate.__module__ == 'gemma4_mlx.generation'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.stdout


def test_token_ids_outside_the_vocabulary_are_refused(loaded):
    from gemma4_mlx.generation import generate

    model, tok = loaded
    vocab = model.args.vocab_size
    for bad in ([1, vocab], [-1, 5]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            generate(model, tok, bad, max_tokens=2)
    assert generate(model, tok, [2, vocab - 1], max_tokens=2).tokens


# -- load(): the tokenizer beside the weights ------------------------------------------------
def test_load_reads_the_tokenizer_while_the_weights_load(tiny_ckpt, monkeypatch):
    """Given the cores, the tokenizer is parsed on its own thread while load_model runs (each waits
    here for the other to have started: one after the other, the first wait would run out)."""
    import threading

    import gemma4_mlx.loading as loading

    started = {"model": threading.Event(), "tokenizer": threading.Event()}
    real_model, real_tokenizer = loading.load_model, loading.load_tokenizer

    def load_model(*args, **kwargs):
        started["model"].set()
        assert started["tokenizer"].wait(30), "the tokenizer waited for the weights"
        return real_model(*args, **kwargs)

    def load_tokenizer(*args, **kwargs):
        started["tokenizer"].set()
        assert started["model"].wait(30), "the weights waited for the tokenizer"
        return real_tokenizer(*args, **kwargs)

    monkeypatch.setattr(loading, "available_cores", lambda: loading.TOKENIZER_THREAD_MIN_CORES)
    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(loading, "load_tokenizer", load_tokenizer)
    model, tokenizer = loading.load(tiny_ckpt)
    assert tokenizer.eos_token_ids == real_tokenizer(tiny_ckpt, model.args.eos_token_id).eos_token_ids
    assert tokenizer.encode("hi there") == real_tokenizer(tiny_ckpt).encode("hi there")


def test_load_on_few_cores_reads_the_tokenizer_after_the_weights(tiny_ckpt, monkeypatch):
    """Below TOKENIZER_THREAD_MIN_CORES (CI's 2 cores: the two threads slowed each other) the
    tokenizer is read on the calling thread, after the weights."""
    import threading

    import gemma4_mlx.loading as loading

    order = []
    real_model, real_tokenizer = loading.load_model, loading.load_tokenizer

    def load_model(*args, **kwargs):
        order.append(("model", threading.current_thread()))
        return real_model(*args, **kwargs)

    def load_tokenizer(*args, **kwargs):
        order.append(("tokenizer", threading.current_thread()))
        return real_tokenizer(*args, **kwargs)

    monkeypatch.setattr(loading, "available_cores", lambda: loading.TOKENIZER_THREAD_MIN_CORES - 1)
    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(loading, "load_tokenizer", load_tokenizer)
    loading.load(tiny_ckpt)
    assert order == [("model", threading.main_thread()), ("tokenizer", threading.main_thread())]


@pytest.mark.parametrize("broken", ["weights", "tokenizer", "both"])
@pytest.mark.parametrize("cores", ["few", "enough"])
def test_load_reports_the_weights_error_first_and_leaves_no_thread(tiny_ckpt, tmp_path, broken, cores,
                                                                   monkeypatch):
    """A failing load() raises the same one-line error either way (the weights' before the
    tokenizer's), and only once the tokenizer's thread, if any, has ended."""
    import shutil
    import threading

    import gemma4_mlx.loading as loading
    from gemma4_mlx.loading import LoadError, load

    need = loading.TOKENIZER_THREAD_MIN_CORES
    monkeypatch.setattr(loading, "available_cores", lambda: need - 1 if cores == "few" else need)

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    if broken in ("weights", "both"):
        for f in folder.glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:100])
    if broken in ("tokenizer", "both"):
        (folder / "tokenizer.json").write_text("{not json")
    before = set(threading.enumerate())
    with pytest.raises(LoadError) as e:
        load(folder)
    assert ("tokenizer could not be loaded" in str(e.value)) == (broken == "tokenizer"), str(e.value)
    assert "\n" not in str(e.value)
    assert not [t for t in threading.enumerate() if t not in before and t.name.startswith("gemma4-mlx-tokenizer")]
