"""Every way a checkpoint can be broken ends in one line naming the file and the problem.

User-facing paths go through the CLI (``gemma4-mlx convert`` loads the source checkpoint with
:func:`gemma4_mlx.load_model`); the library paths are checked for ``LoadError`` directly.
Property tests (hypothesis) cover config parsing; a fuzz pass covers config.json and
safetensors headers.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
from pathlib import Path

import tempfile

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis import strategies as st

from gemma4_mlx import load_model
from gemma4_mlx.checkpoint import convert_checkpoint, write_random_checkpoint
from gemma4_mlx.memory import MemoryWarning, check_memory, estimate_memory
from gemma4_mlx.safetensors_io import read_safetensors_header
from gemma4_mlx.config import FULL, SLIDING, ConfigError, parse_config
from gemma4_mlx.loading import LoadError, model_args
from gemma4_mlx.presets import PRESETS
from cli_harness import invoke as _cli, no_debug  # noqa: F401  (no_debug: autouse fixture)


# Keep hypothesis' example/constants caches out of the working tree.
set_hypothesis_home_dir(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY") or tempfile.mkdtemp(prefix="hypothesis-"))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_random_checkpoint("tiny-31b", tmp_path_factory.mktemp("good") / "ck", dtype="float32")


@pytest.fixture
def ck(good, tmp_path) -> Path:
    """A fresh copy of a good checkpoint to break."""
    dst = tmp_path / "ck"
    shutil.copytree(good, dst)
    return dst


def _one_line_error(ck: Path, tmp_path: Path, *needles: str, extra=()):
    r = _cli(["convert", "--hf-path", str(ck), "--mlx-path", str(tmp_path / "out"), "--quiet", *extra])
    err = r.stderr
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert "Traceback" not in r.output and "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "out").exists()
    return lines[0]


def _rewrite(path: Path, fn):
    w = dict(mx.load(str(path)))
    fn(w)
    mx.save_safetensors(str(path), w, metadata={"format": "pt"})


# --- user-facing errors ---------------------------------------------------------------------------
def test_missing_config(ck, tmp_path):
    (ck / "config.json").unlink()
    _one_line_error(ck, tmp_path, "config.json", "missing")


def test_malformed_config(ck, tmp_path):
    (ck / "config.json").write_text('{"model_type": "gemma4_text", "hidden_size": ')
    _one_line_error(ck, tmp_path, "config.json", "not valid JSON")
    (ck / "config.json").write_text("[1, 2]")
    _one_line_error(ck, tmp_path, "config.json", "JSON object")


def test_unsupported_model_type(ck, tmp_path):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(cfg))
    _one_line_error(ck, tmp_path, "config.json", "unsupported model_type 'llama'")


def test_invalid_config_value(ck, tmp_path):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (ck / "config.json").write_text(json.dumps(cfg))
    _one_line_error(ck, tmp_path, "config.json", "num_attention_heads")


def test_missing_safetensors(ck, tmp_path):
    (ck / "model.safetensors").unlink()
    _one_line_error(ck, tmp_path, str(ck), "no .safetensors")


def test_missing_shard(tmp_path):
    ck = write_random_checkpoint("tiny-31b", tmp_path / "sharded", max_shard_bytes=50_000)
    (ck / "model-00002-of-00004.safetensors").unlink() if (ck / "model-00002-of-00004.safetensors").exists() else \
        sorted(ck.glob("model-*.safetensors"))[1].unlink()
    _one_line_error(ck, tmp_path, "model-0000", "missing")


def test_truncated_safetensors(ck, tmp_path):
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _one_line_error(ck, tmp_path, "model.safetensors", "truncated")
    f.write_bytes(data[:5])
    _one_line_error(ck, tmp_path, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(ck, tmp_path):
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))
    _one_line_error(ck, tmp_path, "model.safetensors", "corrupt")


def test_missing_weights_named_with_shapes(ck, tmp_path):
    _rewrite(ck / "model.safetensors", lambda w: w.pop("model.layers.1.self_attn.q_proj.weight"))
    _one_line_error(ck, tmp_path, str(ck), "1 weight(s) missing", "model.layers.1.self_attn.q_proj.weight (256, 64)")


def test_extra_weights_named_with_shapes(ck, tmp_path):
    _rewrite(ck / "model.safetensors", lambda w: w.update({"model.layers.0.mystery.weight": mx.zeros((3, 5))}))
    _one_line_error(ck, tmp_path, "unexpected weight(s)", "model.layers.0.mystery.weight (3, 5)")


def test_shape_mismatch(ck, tmp_path):
    _rewrite(ck / "model.safetensors", lambda w: w.update({"model.layers.0.mlp.up_proj.weight": mx.zeros((100, 64))}))
    _one_line_error(ck, tmp_path, "model.layers.0.mlp.up_proj.weight", "(100, 64)", "(128, 64)")


def test_config_weights_disagree(ck, tmp_path):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["hidden_size"] = 128
    (ck / "config.json").write_text(json.dumps(cfg))
    _one_line_error(ck, tmp_path, str(ck), "config implies")


@pytest.fixture(scope="module")
def quantized(good, tmp_path_factory) -> Path:
    return convert_checkpoint(good, tmp_path_factory.mktemp("q") / "q4", quantize=True, q_bits=4, q_group_size=32)


def _copy_with_quant(quantized, tmp_path, edit):
    ck = tmp_path / "q"
    shutil.copytree(quantized, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization"] = edit(cfg["quantization"])
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


@pytest.mark.parametrize("edit", [lambda q: {**q, "bits": 8}, lambda q: {**q, "group_size": 128, "bits": 2}])
def test_wrong_bits_or_group_size_are_inferred_from_the_weights(quantized, tmp_path, edit):
    """Like mlx-lm, per-layer bits/group size come from the weights' shapes, so a wrong global
    value in config.json still loads the model exactly."""
    ck = _copy_with_quant(quantized, tmp_path, edit)
    ids = mx.array([[2, 5, 6, 7]])
    assert mx.array_equal(load_model(ck)(ids), load_model(quantized)(ids)).item()


@pytest.mark.parametrize("edit,needle", [
    (lambda q: {k: v for k, v in q.items() if k != "bits"}, "'quantization' needs 'bits' and 'group_size'"),
    (lambda q: "4bit", "'quantization' needs 'bits' and 'group_size'"),
])
def test_wrong_quantization_metadata(quantized, tmp_path, edit, needle):
    ck = _copy_with_quant(quantized, tmp_path, edit)
    line = _one_line_error(ck, tmp_path, needle)
    assert str(ck / "config.json") in line


def test_quantized_weights_that_do_not_fit(quantized, tmp_path):
    ck = tmp_path / "q"
    shutil.copytree(quantized, ck)
    name = "model.layers.0.mlp.up_proj.scales"
    _rewrite(ck / "model.safetensors", lambda w: w.update({name: w[name][:, :1]}))
    _one_line_error(ck, tmp_path, "model.layers.0.mlp.up_proj")


def test_quantization_missing_from_config(quantized, tmp_path):
    ck = tmp_path / "q"
    shutil.copytree(quantized, ck)
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["quantization"], cfg["quantization_config"]
    (ck / "config.json").write_text(json.dumps(cfg))
    _one_line_error(ck, tmp_path, "unexpected weight(s)", "scales")


def test_repo_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    r = _cli(["convert", "--hf-path", "nobody-here/no-such-gemma", "--mlx-path", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.startswith("error: nobody-here/no-such-gemma:") and "HF_HUB_OFFLINE" in r.stderr
    r = _cli(["convert", "--hf-path", "./not/here", "--mlx-path", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 1 and "no such folder" in r.stderr


def test_debug_shows_traceback(ck, tmp_path):
    (ck / "config.json").unlink()
    r = _cli(["--debug", "convert", "--hf-path", str(ck), "--mlx-path", str(tmp_path / "o")])
    assert r.exit_code != 0 and isinstance(r.exception, LoadError)  # re-raised, not swallowed


def test_library_errors_are_load_errors(ck):
    (ck / "config.json").write_text("{")
    with pytest.raises(LoadError, match="config.json: not valid JSON"):
        load_model(ck)
    with pytest.raises(LoadError, match="no such folder"):
        load_model(ck / "nope")


# --- memory --------------------------------------------------------------------------------------
def test_estimate_memory_reads_headers_only(good, monkeypatch):
    expected = sum(int(v.nbytes) for v in mx.load(str(good / "model.safetensors")).values())
    monkeypatch.setattr(mx, "load", lambda *a, **k: pytest.fail("estimate_memory must not load tensors"))
    assert estimate_memory(good) == expected
    with pytest.warns(MemoryWarning, match="GiB"):
        check_memory(good, available=expected // 2)
    with pytest.raises(LoadError, match="strict_memory"):
        check_memory(good, strict=True, available=expected // 2)
    assert check_memory(good, strict=True, available=expected * 10) == expected


def test_strict_memory_refuses_load(good, tmp_path, monkeypatch):
    import gemma4_mlx.memory as memory

    monkeypatch.setattr(memory, "device_memory", lambda: 1000)
    with pytest.raises(LoadError, match="GiB"):
        load_model(good, strict_memory=True)
    with pytest.warns(MemoryWarning):
        load_model(good)
    r = _cli(["convert", "--hf-path", str(good), "--mlx-path", str(tmp_path / "o"), "--strict-memory", "--quiet"])
    assert r.exit_code == 1 and "strict_memory" in r.stderr and not (tmp_path / "o").exists()
    for cmd in (["generate", "--prompt", "hi"], ["chat"]):
        r = _cli([cmd[0], "--model", str(good), *cmd[1:], "--strict-memory"])
        assert r.exit_code == 1 and "GiB" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)


def test_big_preset_estimate_without_weights(tmp_path):
    """The e2b header alone (no data) gives the estimate; a big preset is never written in tests."""
    from gemma4_mlx.checkpoint.random_weights import checkpoint_config, hf_tensor_specs
    from gemma4_mlx.safetensors_io import header_bytes

    args = parse_config(checkpoint_config("e2b"))
    entries = [(n, s, "BF16") for n, s, _ in hf_tensor_specs(args)]
    f = tmp_path / "model.safetensors"
    f.write_bytes(header_bytes(entries, {"format": "pt"}))
    with pytest.raises(LoadError, match="truncated"):
        read_safetensors_header(f)


# --- property tests: config parsing --------------------------------------------------------------
@st.composite
def valid_configs(draw):
    n = draw(st.integers(1, 10))
    types = draw(st.lists(st.sampled_from([SLIDING, FULL]), min_size=n, max_size=n))
    types[-1] = FULL
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0]))
    gkv = draw(st.sampled_from([None] + [d for d in (1, 2, 4) if heads % d == 0]))
    head_dim = draw(st.sampled_from([2, 4, 8, 16, 32]))
    k_eq_v = draw(st.booleans())
    # shared layers need an earlier producer of each type they use
    shared = draw(st.integers(0, n - 1))
    first = n - shared
    produced = set(types[:first])
    if not set(types[first:]) <= produced:
        shared = 0
    cfg = {
        "model_type": "gemma4_text", "vocab_size": draw(st.integers(1, 1000)),
        "hidden_size": draw(st.sampled_from([8, 16, 64])), "num_hidden_layers": n,
        "intermediate_size": draw(st.integers(1, 64)), "num_attention_heads": heads,
        "num_key_value_heads": kv, "num_global_key_value_heads": gkv, "head_dim": head_dim,
        "global_head_dim": draw(st.sampled_from([2, 8, 64])), "layer_types": types,
        "num_kv_shared_layers": shared, "attention_k_eq_v": k_eq_v,
        "hidden_size_per_layer_input": draw(st.sampled_from([0, 4])),
        "use_double_wide_mlp": draw(st.booleans()), "sliding_window": draw(st.integers(1, 4096)),
    }
    if draw(st.booleans()):
        cfg.update(enable_moe_block=True, num_experts=4, top_k_experts=draw(st.integers(1, 4)),
                   moe_intermediate_size=8)
    # shared layers must match their producer's shapes; regenerate the conflict away
    try:
        parse_config(cfg)
    except ConfigError:
        cfg["num_kv_shared_layers"] = 0
    if draw(st.booleans()):
        cfg = {"model_type": "gemma4", "text_config": cfg}
    return cfg


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_configs())
def test_valid_configs_give_consistent_plans(cfg):
    args = parse_config(cfg)
    plan = args.plan
    assert len(plan) == args.num_hidden_layers and plan[-1].layer_type == FULL
    slots = [p.cache_index for p in plan if p.cache_index is not None]
    assert slots == list(range(args.num_caches))
    for p in plan:
        assert p.num_heads % p.num_kv_heads == 0 and p.head_dim % 2 == 0
        assert p.rope.inv_freq.shape == (p.head_dim // 2,)
        if p.is_kv_shared:
            src = plan[p.kv_source]
            assert p.cache_index is None and src.layer_type == p.layer_type and not src.is_kv_shared
            assert (src.head_dim, src.num_kv_heads) == (p.head_dim, p.num_kv_heads)
        else:
            assert p.kv_source == p.index
    # Both dialects describe the same plan.
    from gemma4_mlx.checkpoint.dialects import per_layer_dialect, published_dialect
    from gemma4_mlx.config import text_config_of

    text, _ = text_config_of(cfg)
    other = parse_config(per_layer_dialect(text, args))
    assert [(p.head_dim, p.num_kv_heads) for p in other.plan] == [(p.head_dim, p.num_kv_heads) for p in plan]
    back = parse_config(published_dialect(per_layer_dialect(text, args), args))
    assert [(p.head_dim, p.num_kv_heads) for p in back.plan] == [(p.head_dim, p.num_kv_heads) for p in plan]


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(PRESETS)), st.data())
def test_mutated_configs_raise_only_load_errors(preset, data):
    cfg = copy.deepcopy(PRESETS[preset])
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(cfg) + ["per_layer_config", "rope_parameters", "layer_types"]))
        if data.draw(st.booleans()) and key in cfg:
            del cfg[key]
        elif key == "rope_parameters":
            cfg[key] = {data.draw(st.sampled_from([SLIDING, FULL])): data.draw(JUNK)}
        elif key == "layer_types":
            cfg[key] = data.draw(st.lists(st.one_of(st.sampled_from([SLIDING, FULL]), JUNK), max_size=12))
        elif key == "per_layer_config":
            cfg[key] = {data.draw(st.sampled_from(["0", "1", "x", "99"])): data.draw(JUNK)}
        else:
            cfg[key] = data.draw(JUNK)
    try:
        model_args(Path("mutated"), cfg)
    except LoadError:
        pass


# --- fuzz: config.json and safetensors headers through load_model -------------------------------
def _fuzz_header(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    name = rng.choice([k for k in header if k != "__metadata__"])
    e = header[name]
    choice = rng.randrange(9)
    if choice == 0:
        e["dtype"] = rng.choice(["F64", "I8", "BF16", "Q4", "", 7, None])
    elif choice == 1:
        e["shape"] = rng.choice([[], [0], [-1, 4], [1] * 20, "x", [2**40, 2**40], [3.5]])
    elif choice == 2:
        e["data_offsets"] = rng.choice([[0], [5, 1], [0, 2**62], ["a", 1], None, [-8, 0]])
    elif choice == 3:
        other = rng.choice([k for k in header if k != "__metadata__"])
        e["data_offsets"] = list(header[other]["data_offsets"])
    elif choice == 4:
        header[name] = rng.choice([None, 3, "x", []])
    elif choice == 5:
        header["__metadata__"] = rng.choice([3, "x", [1]])
    elif choice == 6:
        del header[name]
    elif choice == 7:
        e["shape"] = list(reversed(e["shape"]))
    else:
        header[name + ".extra"] = dict(e)
    raw = json.dumps(header).encode()
    if rng.random() < 0.2:
        raw = raw[: rng.randrange(len(raw))]
    raw += b" " * (-len(raw) % 8)
    length = len(raw) if rng.random() < 0.85 else rng.choice([0, len(raw) + 7, 2**63, 2**31])
    return struct.pack("<Q", length) + raw + body


def test_fuzz_folder_raise_only_load_errors(good, tmp_path):
    rng = random.Random(1234)
    original = (good / "model.safetensors").read_bytes()
    config = (good / "config.json").read_text()
    ck = tmp_path / "fz"
    shutil.copytree(good, ck)
    outcomes = {"ok": 0, "LoadError": 0}
    for i in range(120):
        kind = i % 4
        data, cfg = original, config
        if kind == 0:  # header JSON edits
            data = _fuzz_header(original, rng)
        elif kind == 1:  # truncations
            data = original[: rng.randrange(len(original))]
        elif kind == 2:  # random bytes over the header or the whole file
            b = bytearray(original)
            for _ in range(rng.randrange(1, 20)):
                b[rng.randrange(min(len(b), 4000 if rng.random() < 0.7 else len(b)))] = rng.randrange(256)
            data = bytes(b)
        else:  # malformed config.json
            c = bytearray(config.encode())
            op = rng.randrange(3)
            if op == 0:
                c = c[: rng.randrange(len(c))]
            elif op == 1:
                for _ in range(rng.randrange(1, 6)):
                    c[rng.randrange(len(c))] = rng.randrange(256)
            else:
                d = json.loads(config)
                d[rng.choice(list(d))] = rng.choice([None, -1, "x", [], {}, 1e309, True])
                c = bytearray(json.dumps(d).encode())
            cfg = bytes(c).decode("utf-8", "replace")
        (ck / "model.safetensors").write_bytes(data)
        (ck / "config.json").write_text(cfg, encoding="utf-8")
        try:
            load_model(ck)
            outcomes["ok"] += 1
        except LoadError as e:
            assert str(e).strip() and "\n" not in str(e).strip(), repr(e)
            outcomes["LoadError"] += 1
    assert outcomes["LoadError"] > 60, outcomes


@pytest.mark.parametrize("break_it,needle", [
    (lambda ck: (ck / "config.json").unlink(), "config.json: missing"),
    (lambda ck: (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:3000]), "truncated"),
])
def test_generate_reports_broken_checkpoints_in_one_line(ck, break_it, needle):
    """The same one-line errors through `gemma4-mlx generate`."""
    break_it(ck)
    r = _cli(["generate", "--model", str(ck), "--prompt", "hi", "--max-tokens", "2"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
