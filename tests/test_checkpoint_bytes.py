"""``write_random_checkpoint`` writes the same bytes as before the checkpoint module was split.

The digests below were computed from the code as it stood before the split (commit b026a28): the
weight files (every ``*.safetensors`` and the shard index) and config.json without its token ids.
Token ids are left out because they come from the synthesized tokenizer, not from the writer.
A change here means every random checkpoint anyone wrote before differs from one written now.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gemma4_mlx.checkpoint import write_random_checkpoint

TOKEN_FIELDS = ("eos_token_id", "bos_token_id", "pad_token_id")

CASES = [
    ("tiny", {}, 1, "1711f8d65e8abc40262a3a328682ddf2dffd54e0a9f5879111074129fbe810ad"),
    ("tiny-31b", {"dtype": "float32"}, 1, "7f3e0de75ab4046c687020b683fc905f490d1eb91074a2099715511cfaf3492a"),
    ("tiny-moe", {"dtype": "float16", "wrapper": True, "dialect": "per_layer", "seed": 7}, 1,
     "7feb4f8de68c7220e31f21751b9bc0bf5082a661c876738ef102b5373354c15c"),
    ("tiny", {"max_shard_bytes": 50_000, "seed": 3}, 22,
     "5df00d8ef108431b1d1f2bdc81ced23ae3daaf619b8615b6ea841e9d1372629d"),
]


def weights_digest(folder: Path):
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith((".safetensors", ".index.json")))
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    return len(names), h.hexdigest()


def config_without_token_ids(config):
    config = {k: v for k, v in config.items() if k not in TOKEN_FIELDS}
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = config_without_token_ids(config["text_config"])
    return config


@pytest.mark.parametrize("preset,kwargs,files,digest", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_random_checkpoint_bytes_unchanged(tmp_path, preset, kwargs, files, digest):
    out = write_random_checkpoint(preset, tmp_path / "ck", **kwargs)
    assert weights_digest(out) == (files, digest)


CONFIG_CASES = [
    ("tiny-moe", {"dtype": "float16", "wrapper": True, "dialect": "per_layer"},
     "bf1990da29b5773f77156caa224e8aca12c75f9bf90230661c1654d95c0ac444"),
    ("tiny-31b", {}, "d97936834c118cb8ecde940dc274009ea8f424bf0d3f367165ae054a43b747c8"),
]


@pytest.mark.parametrize("preset,kwargs,digest", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_random_checkpoint_config_unchanged(tmp_path, preset, kwargs, digest):
    out = write_random_checkpoint(preset, tmp_path / "ck", **kwargs)
    text = json.dumps(config_without_token_ids(json.loads((out / "config.json").read_text())), sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == digest
