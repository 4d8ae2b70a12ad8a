"""The same request gives the same tokens, whatever ran before it in the process.

Generating P1, P2, P1 must give P1's tokens twice (bf16 and float32, the compiled decode step and
the eager one). The old design ran the first step at each new cache shape uncompiled, so a
request's tokens depended on which shapes earlier requests had traced.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import generate, load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gemma4_mlx.checkpoint import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("det") / "tiny", dtype="float32", seed=3)


def _ids(n: int, seed: int, vocab: int):
    # token ids clear of the special ones (so no early end-of-turn)
    return [int(t) for t in np.random.default_rng(seed).integers(300, vocab, size=n)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compiled", ["1", "0"])
def test_the_same_request_gives_the_same_tokens(checkpoint, dtype, compiled, monkeypatch):
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", compiled)
    model, tok = load(checkpoint)
    model.set_dtype(getattr(mx, dtype))
    vocab = model.args.vocab_size
    # P1 and P2 differ in length, so they need differently sized cache buffers; both run far past
    # the 8-token sliding window of the tiny preset.
    p1, p2 = _ids(37, 1, vocab), _ids(300, 2, vocab)
    kw = dict(max_tokens=40, stop_ids=[], temp=0.0)
    eager_steps = []
    original = type(model)._eager

    def spy(self, inputs, *a, **k):
        from gemma4_mlx import step_context

        if inputs.shape[1] == 1 and step_context.active() is None:
            eager_steps.append(1)
        return original(self, inputs, *a, **k)

    monkeypatch.setattr(type(model), "_eager", spy)
    first = generate(model, tok, p1, **kw).tokens
    other = generate(model, tok, p2, **kw).tokens
    again = generate(model, tok, p1, **kw).tokens
    assert len(first) == 40 and len(other) == 40
    assert again == first
    if compiled == "1":
        # every decode step of the three requests ran compiled (none uncompiled, not even the
        # first at a new buffer shape): one trace per buffer shape
        assert not eager_steps
        assert model._decoder.counts["traces"] <= 2
