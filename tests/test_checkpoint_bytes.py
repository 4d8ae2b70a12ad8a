"""``write_random_checkpoint`` writes the same bytes for the same revision of what it draws.

The digests below cover the weight files (every ``*.safetensors`` and the shard index) and
config.json without its token ids. Token ids are left out because they come from the synthesized
tokenizer, not from the writer. The weight digests are those of ``WEIGHTS_REVISION`` 2 (per-layer
layer scalars; revision 1's were computed before the checkpoint module was split, commit
b026a28). A change here means every random checkpoint anyone wrote before differs from one
written now: bump ``WEIGHTS_REVISION`` with the digests, so cached benchmark folders are rewritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gemma4_mlx.checkpoint import write_random_checkpoint
from gemma4_mlx.checkpoint.random_weights import WEIGHTS_REVISION

TOKEN_FIELDS = ("eos_token_id", "bos_token_id", "pad_token_id")

CASES = [
    ("tiny", {}, 1, "b5f04146cb59034eb7119c3084fcdc9f0a5e92478c7267a47884c741ce49ab5f"),
    ("tiny-31b", {"dtype": "float32"}, 1, "6784885d9896cd4e01db2cd1d38de0f03b58d5e98fd54db99e98a723f7067b0e"),
    ("tiny-moe", {"dtype": "float16", "wrapper": True, "dialect": "per_layer", "seed": 7}, 1,
     "a87f156e402a7644a6b5d61f14a6a1b70cd3c5018fb4eab78ca6dabccf2ade84"),
    ("tiny", {"max_shard_bytes": 50_000, "seed": 3}, 22,
     "407ea12b3e5c5690fa47e6cf72f0cffc53f07b026ab7c812d2968c32c1c5bd3d"),
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
    assert WEIGHTS_REVISION == 2  # the digests' revision
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
