"""The HF transformers (PyTorch) reference line: Gemma4ForCausalLM with our weights."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .measure import make_prompt, median
from .pair import quant_specs
from .settings import BenchSettings


def _hf_state_dict(ours: nn.Module):
    """Our parameters under HF Gemma4ForCausalLM names, as float32 numpy arrays (one at a time)."""
    params = dict(tree_flatten(ours.parameters()))
    f32 = lambda v: np.array(v.astype(mx.float32))
    for k, v in params.items():
        if k.endswith(".switch_glu.gate_proj.weight"):
            base = k[: -len(".switch_glu.gate_proj.weight")]
            up = params[base + ".switch_glu.up_proj.weight"]
            yield base + ".gate_up_proj", np.concatenate([f32(v), f32(up)], axis=-2)
        elif k.endswith(".switch_glu.up_proj.weight"):
            continue
        elif k.endswith(".switch_glu.down_proj.weight"):
            yield k[: -len(".switch_glu.down_proj.weight")] + ".down_proj", f32(v)
        else:
            yield k, f32(v)


def hf_config_kwargs(args) -> Dict[str, Any]:
    """Gemma4TextConfig kwargs for our resolved ModelArgs (published dialect; transformers reads it)."""
    return dict(
        vocab_size=args.vocab_size, vocab_size_per_layer_input=args.vocab_size_per_layer_input or args.vocab_size,
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim, global_head_dim=args.global_head_dim,
        num_global_key_value_heads=args.num_global_key_value_heads, rms_norm_eps=args.rms_norm_eps,
        sliding_window=args.sliding_window, layer_types=list(args.layer_types),
        rope_parameters=args.rope_parameters, max_position_embeddings=args.max_position_embeddings,
        final_logit_softcapping=args.final_logit_softcapping, tie_word_embeddings=args.tie_word_embeddings,
        hidden_size_per_layer_input=args.hidden_size_per_layer_input, num_kv_shared_layers=args.num_kv_shared_layers,
        use_double_wide_mlp=args.use_double_wide_mlp, attention_k_eq_v=args.attention_k_eq_v,
        enable_moe_block=args.enable_moe_block, num_experts=args.num_experts, top_k_experts=args.top_k_experts,
        moe_intermediate_size=args.moe_intermediate_size, hidden_activation=args.hidden_activation,
        eos_token_id=args.eos_token_id, bos_token_id=args.bos_token_id, pad_token_id=args.pad_token_id,
    )


def _prefix_match(a: List[int], b: Optional[List[int]]):
    if not b:
        return None
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def transformers_reference(ours: nn.Module, s: BenchSettings, vocab: int, log: Callable[[str], None],
                           check_tokens: Optional[List[int]] = None) -> Dict[str, Any]:
    """Prefill and decode tok/s of HF Gemma4ForCausalLM with the same weights (PyTorch)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        log(f"transformers reference skipped: {e.name or e} is not installed")
        return {"skipped": f"{e.name or e} not installed"}
    if quant_specs(ours):
        log("transformers reference skipped: quantized MLX weights have no transformers equivalent here")
        return {"skipped": "quantized weights"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        s.dtype if s.dtype != "auto" else "bfloat16")
    log(f"transformers reference: HF Gemma4ForCausalLM on {dev} ({tdtype}) ...")
    try:
        cfg = transformers.Gemma4TextConfig(**hf_config_kwargs(ours.args))
        try:
            cfg._attn_implementation = "sdpa"
        except Exception:
            pass
        with torch.device(dev):
            hf = transformers.Gemma4ForCausalLM(cfg)
        hf = hf.to(dtype=tdtype)
        sd = {k: torch.from_numpy(v).to(device=dev, dtype=tdtype) for k, v in _hf_state_dict(ours)}
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        real_missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        if real_missing or unexpected:
            raise RuntimeError(f"weight names differ: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
        hf = hf.to(device=dev, dtype=tdtype).eval()
    except Exception as e:
        log(f"transformers reference skipped: could not build the model: {type(e).__name__}: {e}")
        return {"skipped": f"build failed: {type(e).__name__}: {e}"}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    import inspect

    # transformers >= 5.3x renamed past_key_values to cache
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def _hf_cache(out):
        return getattr(out, "cache", None) if cache_kw == "cache" else out.past_key_values

    def run(L: int, n: int) -> Dict[str, Any]:
        """Greedy loop with HF's KV cache: one forward over the prompt, then one per token."""
        ids = torch.from_numpy(np.array(make_prompt(L, vocab, s.seed)).astype(np.int64))[None].to(dev)
        toks = []
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            out = hf(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt.item()))
            t1 = time.perf_counter()
            past = _hf_cache(out)
            for _ in range(n - 1):
                out = hf(input_ids=nxt, use_cache=True, **{cache_kw: past})
                past = _hf_cache(out)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(nxt.item()))
            sync()
            t2 = time.perf_counter()
        ttft = t1 - t0
        return {"ttft_s": ttft, "prefill_tps": L / ttft, "decode_tps": (n - 1) / (t2 - t1), "tokens": toks}

    res: Dict[str, Any] = {"device": dev, "dtype": str(tdtype), "torch": torch.__version__,
                           "transformers": transformers.__version__, "runs": {}, "medians": {}}
    try:
        for L in s.prompt_lengths:
            warm = run(L, max(2, min(s.decode_tokens, 8)))  # warm-up
            if L == min(s.prompt_lengths):
                res["tokens_match_ours"] = _prefix_match(warm["tokens"], check_tokens)
            rs = [run(L, s.decode_tokens) for _ in range(s.runs)]
            res["runs"][str(L)] = [{k: v for k, v in r.items() if k != "tokens"} for r in rs]
            res["medians"][str(L)] = {k: median([r[k] for r in rs]) for k in ("ttft_s", "prefill_tps", "decode_tps")}
            log(f"  transformers prompt {L:>6}: prefill {res['medians'][str(L)]['prefill_tps']:,.0f} tok/s, "
                f"decode {res['medians'][str(L)]['decode_tps']:,.1f} tok/s")
        res["note"] = ("greedy loop over HF's KV cache (one forward for the prompt, one per token), "
                       "sdpa attention; tokens_match_ours compares its first tokens with ours' token check")
    except Exception as e:
        log(f"transformers reference failed: {type(e).__name__}: {e}")
        res["error"] = f"{type(e).__name__}: {e}"
    return res
