"""One process of a sharded run (tests/test_sharding.py starts N of them on MLX's ring backend).

``python sharding_worker.py JOB.json``: loads every checkpoint the job names (our loader shards
it over the launched group), runs :func:`greedy_run` and writes this rank's arrays to
``<out>/<case>.rank<r>.npz``. The test computes the same in one process and compares.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np


def free_ports(n: int) -> List[int]:
    """n local ports free now (for a ring hostfile: what ``mlx.launch --backend ring`` writes)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair() -> int:
    """A local port p with p + 1 free too, both checked now: ``mlx.launch --backend ring -p p``
    gives rank i port p + i (a bound or a listening p + 1 was not checked before)."""
    for _ in range(50):
        p = free_ports(1)[0]
        if p >= 65535:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free local ports")


def greedy_run(model, prompt: List[int], steps: int, modes=("0", "1"), forward: bool = True) -> Dict[str, np.ndarray]:
    """Greedy decoding of ``prompt`` for each ``GEMMA4_MLX_COMPILE`` mode (0: eager one-token
    steps, 1: the compiled step): the prompt's logits, the tokens and the logits every step saw;
    with ``forward`` also the logits of one cache-less forward of the prompt."""
    ids = mx.array([prompt])
    out = {}
    if forward:
        out["forward"] = np.array(model(ids)[0].astype(mx.float32))
    old = os.environ.get("GEMMA4_MLX_COMPILE")
    try:
        for mode in modes:
            os.environ["GEMMA4_MLX_COMPILE"] = mode
            cache = model.make_cache()
            logits = model(ids, cache=cache)
            out.setdefault("prefill", np.array(logits[0].astype(mx.float32)))
            logits = logits[:, -1]
            tokens, seen = [], []
            for _ in range(steps):
                token = mx.argmax(logits, axis=-1)
                seen.append(np.array(logits[0].astype(mx.float32)))
                tokens.append(token.item())
                logits = model(token[:, None], cache=cache)[:, -1]
            seen.append(np.array(logits[0].astype(mx.float32)))
            out[f"tokens_compile{mode}"] = np.array(tokens)
            out[f"decode_compile{mode}"] = np.stack(seen)
    finally:
        if old is None:
            os.environ.pop("GEMMA4_MLX_COMPILE", None)
        else:
            os.environ["GEMMA4_MLX_COMPILE"] = old
    return out


def batch_tokens(model, tokenizer, prompt: List[int]) -> List[np.ndarray]:
    """mlx-lm's batch_generate over a short and a long prompt (rows of a batch, B > 1)."""
    import mlx_lm

    out = mlx_lm.batch_generate(model, tokenizer, [prompt[:3], prompt], max_tokens=4, return_token_ids=True)
    return [np.array(ids) for ids in out.token_ids]


def _mlx_lm_sharded_load(path: str):
    """mlx-lm's own ``sharded_load``, made to pick this package's model class (what the
    ``gemma4-mlx mlx-lm`` shim does for Gemma 4 checkpoints)."""
    import functools

    import mlx_lm.utils as mlx_utils

    from gemma4_mlx import Model, ModelArgs

    original = mlx_utils.load_model
    mlx_utils.load_model = functools.partial(original, get_model_classes=lambda config: (Model, ModelArgs))
    try:
        model, _ = mlx_utils.sharded_load(path)
    finally:
        mlx_utils.load_model = original
    return model


def main(job_file: str) -> None:
    from mlx.utils import tree_flatten

    from gemma4_mlx import LoadError, load, load_model
    from gemma4_mlx.server import model_loader
    from gemma4_mlx.generation import generate

    job = json.loads(Path(job_file).read_text())
    group = mx.distributed.init()
    assert group.size() == job["size"], f"expected a group of {job['size']}, got {group.size()}"
    rank = group.rank()
    out = Path(job["out"])
    for case in job["cases"]:
        start = time.perf_counter()
        loader = case.get("loader", "load_model")
        if case.get("expect_error"):
            try:
                load_model(case["path"])
            except LoadError as e:
                (out / f"{case['name']}.rank{rank}.txt").write_text(str(e))
                continue
            raise AssertionError(f"{case['name']}: loading did not fail")
        if loader == "load_model":
            model = load_model(case["path"])
        elif loader == "mlx_lm.sharded_load":
            model = _mlx_lm_sharded_load(case["path"])
        elif loader == "server":  # what `gemma4-mlx serve` loads with
            model, _ = model_loader(case["path"])()
        elif loader == "shard_after_use":
            # a whole model that already ran its compiled step (joined projections, a trace),
            # then sharded by hand
            model = load_model(case["path"], shard=False)
            greedy_run(model, job["prompt"], 2, modes=("1",), forward=False)
            model.shard(group)
        else:
            raise ValueError(f"unknown loader {loader}")
        assert model.sharding_group is not None
        result = greedy_run(model, job["prompt"], job["steps"], modes=job.get("modes", ("0", "1")),
                            forward=job.get("forward", True))
        result["param_bytes"] = np.array(sum(v.nbytes for _, v in tree_flatten(model.parameters())))
        result["random"] = np.array(mx.random.uniform(shape=(4,)))
        if case.get("count_collectives"):
            from bench.sharded import decode_step_collectives

            records = decode_step_collectives(model, mx.array(job["prompt"]))
            result["collectives"] = np.array(json.dumps([{k: r[k] for k in ("op", "shape", "bytes")} for r in records]))
        if "experts" in model.layers[0]:
            result["expert_width"] = np.array(model.layers[0].experts.switch_glu.gate_proj.weight.shape[1])
        np.savez(out / f"{case['name']}.rank{rank}.npz", **result)
        print(f"rank {rank}: {case['name']} {time.perf_counter() - start:.1f} s", flush=True)
    if job.get("sample", True):
        # temp > 0 without a seed: the loader gave every rank the same random state
        model, tokenizer = load(job["cases"][0]["path"])
        reply = generate(model, tokenizer, "Hello", max_tokens=6, temp=1.0)
        np.save(out / f"sampled.rank{rank}.npy", np.array(reply.tokens))
        np.savez(out / f"batch.rank{rank}.npz", *batch_tokens(model, tokenizer, job["prompt"]))
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
