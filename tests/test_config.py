"""Config parsing: both dialects give the same plan, and malformed configs fail with ConfigError only."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4_mlx.config import FULL, ConfigError, parse_config
from gemma4_mlx.presets import PRESETS, preset_config


def per_layer_dialect(cfg):
    """The transformers >= 5.2 form of a published-dialect config."""
    out = copy.deepcopy(cfg)
    gdim = out.pop("global_head_dim")
    gkv = out.pop("num_global_key_value_heads")
    overrides = {}
    for i, t in enumerate(out["layer_types"]):
        if t == FULL:
            o = {"head_dim": gdim}
            if out["attention_k_eq_v"] and gkv is not None:
                o["num_key_value_heads"] = gkv
            overrides[str(i)] = o
    out["per_layer_config"] = overrides
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_dialects_and_wrapper_give_one_plan(name):
    cfg = preset_config(name)
    plans = [
        parse_config(cfg).plan,
        parse_config(per_layer_dialect(cfg)).plan,
        parse_config({"model_type": "gemma4", "text_config": cfg, "vocab_size": 262144}).plan,
    ]
    assert plans[0] == plans[1] == plans[2]
    for a, b in zip(plans[0], plans[1]):
        assert (a.rope.inv_freq == b.rope.inv_freq).all()


def test_e2b_plan_is_the_published_architecture():
    args = parse_config(preset_config("e2b"))
    plan = args.plan
    assert args.num_caches == 15
    assert [p.layer_type == FULL for p in plan[:5]] == [False] * 4 + [True]
    assert {p.head_dim for p in plan if p.layer_type == FULL} == {512}
    assert {p.head_dim for p in plan if p.layer_type != FULL} == {256}
    # shared layers read the last non-shared layer of their type: 13 (sliding) and 14 (full)
    assert {p.kv_source for p in plan[15:]} == {13, 14}
    assert all(p.mlp_width == 2 * 6144 for p in plan[15:]) and all(p.mlp_width == 6144 for p in plan[:15])
    full = plan[4].rope
    assert full.rotated_pairs == 64 and full.inv_freq[64:].max() == 0  # 0.25 of 512 dims rotate


def test_inconsistent_sharing_is_a_clear_error():
    cfg = preset_config("tiny")
    cfg["layer_types"] = ["sliding_attention"] * 4 + ["full_attention"] * 2
    cfg["num_kv_shared_layers"] = 2  # shared full layers 4, 5: no earlier full layer produces a cache
    with pytest.raises(ConfigError, match="no earlier non-shared full_attention"):
        parse_config(cfg)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**7) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["tiny", "tiny-moe", "tiny-e4b", "tiny-31b"]),
       key=st.sampled_from(sorted(set(preset_config("tiny")) | {"per_layer_config", "text_config", "model_type"})),
       value=JSON, wrap=st.booleans())
def test_mutated_configs_raise_only_config_error(name, key, value, wrap):
    cfg = preset_config(name)
    cfg[key] = value
    if wrap:
        cfg = {"model_type": "gemma4", "text_config": cfg}
    json.dumps(cfg, allow_nan=True)
    try:
        args = parse_config(cfg)
    except ConfigError:
        return
    assert len(args.plan) == args.num_hidden_layers
