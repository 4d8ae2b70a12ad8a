"""The token check of ``gemma4-mlx compare`` (gemma4_mlx/bench/measure.py) runs a prompt through
each model's cache in chunks of the prefill step, never in one forward (a 32,768-token forward
died inside MLX on CUDA)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from gemma4_mlx.bench.measure import Counted, last_logits, make_prompt, token_check
from gemma4_mlx.bench.pair import build_pair
from gemma4_mlx.bench.settings import BenchSettings

PROMPT = 300
CHUNK = 64  # five chunks of the 300-token prompt


class Widths(Counted):
    """Counts forward calls and remembers the widest input each one got."""

    def __init__(self, model):
        super().__init__(model)
        self.widths = []

    def __call__(self, x, *args, **kwargs):
        self.widths.append(int(x.shape[-1]))
        return super().__call__(x, *args, **kwargs)


@pytest.fixture(scope="module")
def tiny_pair():
    ours, stock, meta = build_pair(BenchSettings(preset="tiny", dtype="float32").resolve())
    return ours, stock, meta["vocab_size"]


def test_chunked_check_gives_the_same_tokens_and_logits(tiny_pair):
    ours, stock, vocab = tiny_pair
    prompt = make_prompt(PROMPT, vocab, 0)
    a, b = Widths(ours), Widths(stock)
    chunked = token_check(a, b, prompt, 12, "float32", prefill_step_size=CHUNK)
    assert max(a.widths) <= CHUNK and max(b.widths) <= CHUNK  # no forward saw the whole prompt
    assert a.calls >= PROMPT // CHUNK + 12 and b.calls >= PROMPT // CHUNK + 12
    whole = token_check(ours, stock, prompt, 12, "float32", prefill_step_size=4096)
    assert chunked["ours_tokens"] == whole["ours_tokens"] and chunked["stock_tokens"] == whole["stock_tokens"]
    assert chunked["passed"] and chunked["match"] and chunked["logits_finite"]
    assert chunked["max_abs_logit_diff_last_prompt_position"] == pytest.approx(
        whole["max_abs_logit_diff_last_prompt_position"], abs=1e-5)
    for model in (ours, stock):  # the chunked pass gives the one-piece forward's last logits
        one_piece = model(prompt[None])[:, -1].astype(mx.float32)
        assert mx.allclose(last_logits(model, prompt, CHUNK), one_piece, atol=1e-4, rtol=1e-4).item()


def test_long_prompt_check_runs(tiny_pair):
    ours, stock, vocab = tiny_pair
    res = token_check(ours, stock, make_prompt(4096, vocab, 0), 2, "float32", prefill_step_size=512)
    assert res["prompt_length"] == 4096 and res["logits_finite"] and res["passed"]
    assert len(res["ours_tokens"]) == len(res["stock_tokens"]) == 2


def test_last_logits_rejects_a_zero_step(tiny_pair):
    with pytest.raises(ValueError, match="prefill_step_size"):
        last_logits(tiny_pair[0], make_prompt(8, tiny_pair[2], 0), 0)
