"""What a kernel body compiles to on an NVIDIA GPU, without one: registers, spills and the
instruction mix of its hottest loop. NVRTC (``pip install nvidia-cuda-nvrtc``) builds the exact
source our CUDA path builds; ``cuobjdump`` (``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``) disassembles it.

    python bench/kernel_sass.py qmv --template T=bfloat16 BITS=4 GS=64 ROWS=2 SPLIT=2 WPL=4 MM=1 EPI=0 PRO=0 HD=1 LOOP=1
    python bench/kernel_sass.py attention_partial --template T=bfloat16 D=256 RT=8 QNR=0

A memory-bound matvec has to keep few instructions per byte and many bytes in flight: this shows
both sides of that (``--sass`` prints the whole disassembly).
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from gemma4_mlx.kernels import cuda_build, dispatch, nvrtc  # noqa: E402

# Per body: its inputs, outputs, and the input dtypes and ndims that are not (T, 2-D; x: 3-D).
KERNELS = {
    "qmv": dict(inputs=["x", "w", "scales", "biases", "z", "b", "nw", "ls", "nn", "eps"], outputs=["y", "hout"],
                dtypes={"w": mx.uint32, "eps": mx.float32}, ndims={"x": 3}),
    # qmv over one buffer of words, scales and biases (QPACK), as its bare form launches it
    "qmv_packed": dict(body="qmv", inputs=["x", "w"], outputs=["y"], defines=[("NO_PROLOGUE_INPUTS", 1), ("NO_Z", 1),
                                                                             ("QPACK", 1)],
                       dtypes={"w": mx.uint32}, ndims={"x": 3}),
    "mv": dict(inputs=["x", "w", "z", "b", "nw", "ls", "nn", "eps"], outputs=["y", "hout"],
               dtypes={"eps": mx.float32}, ndims={"x": 3}),
    # the closing forms (mv.py / qmv.py's matvec_close: the product and its sublayer's close)
    "mv_close": dict(body="mv", inputs=["x", "w", "res", "cw", "ls", "cn", "eps", "counter"], outputs=["hout", "nout"],
                     defines=[("MATVEC_CLOSE", 1), ("CLOSE_NO_NEXT", 0)],
                     dtypes={"eps": mx.float32, "counter": mx.int32},
                     ndims={"x": 3, "res": 3, "cw": 1, "ls": 1, "cn": 1, "eps": 1, "counter": 1}),
    "qmv_close": dict(body="qmv", inputs=["x", "w", "scales", "biases", "res", "cw", "ls", "cn", "eps", "counter"],
                      outputs=["hout", "nout"], defines=[("MATVEC_CLOSE", 1), ("CLOSE_NO_NEXT", 0)],
                      dtypes={"w": mx.uint32, "eps": mx.float32, "counter": mx.int32},
                      ndims={"x": 3, "res": 3, "cw": 1, "ls": 1, "cn": 1, "eps": 1, "counter": 1}),
    # a PLE layer's down projection, its close and its PLE gate (qmv.py's quantized_matvec_close_gate), its arrays
    # apart (the packed form below the table)
    "qmv_close_gate": dict(body="qmv", inputs=["x", "w", "scales", "biases", "res", "cw", "ls", "eps", "counter", "gw",
                                               "gsc", "gbi", "gz"],
                           outputs=["hout", "gout"], defines=[("MATVEC_CLOSE", 1), ("CLOSE_NO_NEXT", 1),
                                                              ("CLOSE_GATE", 1)],
                           dtypes={"w": mx.uint32, "eps": mx.float32, "counter": mx.int32, "gw": mx.uint32},
                           ndims={"x": 3, "res": 3, "cw": 1, "ls": 1, "eps": 1, "counter": 1, "gz": 3}),
    # a MoE layer's feed-forward output with the layer's close (moe.py's norm_pair_close, FORM 2)
    "norm_pair_close": dict(body="norm_pair", inputs=["x", "x2", "mw", "w1", "w2", "s1", "eps", "res", "cw", "ls", "cn"],
                            outputs=["hout", "nout"], defines=[("PAIR_MIX", 1), ("PAIR_CLOSE", 1), ("CLOSE_NO_NEXT", 0)],
                            dtypes={"mw": mx.float32, "s1": mx.float32, "eps": mx.float32},
                            ndims={"x": 3, "x2": 4, "mw": 3, "w1": 1, "w2": 1, "s1": 1, "eps": 1, "res": 3, "cw": 1,
                                   "ls": 1, "cn": 1}),
    "attention_partial": dict(
        inputs=["q", "keys", "values", "scale", "params", "kv_len", "qw", "inv_freq", "qoff", "qeps"],
        outputs=["po", "pm", "pl"], out_dtype=mx.float32,
        dtypes={"scale": mx.float32, "params": mx.int32, "kv_len": mx.int32, "inv_freq": mx.float32,
                "qoff": mx.int32, "qeps": mx.float32},
        ndims={"q": 4, "keys": 4, "values": 4, "scale": 1, "params": 1, "kv_len": 1, "qw": 1, "inv_freq": 1,
               "qoff": 1, "qeps": 1}),
    # pass 1 with the merge (attention.py's fused form): its scratch in float32, its output in T
    "attention_fused": dict(
        body="attention_partial", inputs=["q", "keys", "values", "scale", "params", "kv_len", "counter"],
        outputs=["ws", "out"], out_dtypes=[mx.float32, None], defines=[("NO_QNR_INPUTS", 1), ("ATTN_FUSED", 1)],
        dtypes={"scale": mx.float32, "params": mx.int32, "kv_len": mx.int32, "counter": mx.int32},
        ndims={"q": 4, "keys": 4, "values": 4, "scale": 1, "params": 1, "kv_len": 1, "counter": 1}),
    # the fused form with the q norm and RoPE in its prologue (attention.py's attention_prefix_q, fused)
    "attention_fused_q": dict(
        body="attention_partial",
        inputs=["q", "keys", "values", "scale", "params", "kv_len", "qw", "inv_freq", "qoff", "qeps", "counter"],
        outputs=["ws", "out"], out_dtypes=[mx.float32, None], defines=[("ATTN_FUSED", 1)],
        dtypes={"scale": mx.float32, "params": mx.int32, "kv_len": mx.int32, "inv_freq": mx.float32,
                "qoff": mx.int32, "qeps": mx.float32, "counter": mx.int32},
        ndims={"q": 4, "keys": 4, "values": 4, "scale": 1, "params": 1, "kv_len": 1, "qw": 1, "inv_freq": 1,
               "qoff": 1, "qeps": 1, "counter": 1}),
    # both with their scratch a shared int32 input they write (GEMMA4_MLX_ATTN_SCRATCH), no output of its own
    "attention_fused_scratch": dict(
        body="attention_partial", inputs=["q", "keys", "values", "scale", "params", "kv_len", "counter", "ws"],
        outputs=["out"], out_dtypes=[None], defines=[("NO_QNR_INPUTS", 1), ("ATTN_FUSED", 1), ("ATTN_SCRATCH", 1)],
        dtypes={"scale": mx.float32, "params": mx.int32, "kv_len": mx.int32, "counter": mx.int32, "ws": mx.int32},
        ndims={"q": 4, "keys": 4, "values": 4, "scale": 1, "params": 1, "kv_len": 1, "counter": 1, "ws": 1}),
    "attention_fused_q_scratch": dict(
        body="attention_partial",
        inputs=["q", "keys", "values", "scale", "params", "kv_len", "qw", "inv_freq", "qoff", "qeps", "counter", "ws"],
        outputs=["out"], out_dtypes=[None], defines=[("ATTN_FUSED", 1), ("ATTN_SCRATCH", 1)],
        dtypes={"scale": mx.float32, "params": mx.int32, "kv_len": mx.int32, "inv_freq": mx.float32,
                "qoff": mx.int32, "qeps": mx.float32, "counter": mx.int32, "ws": mx.int32},
        ndims={"q": 4, "keys": 4, "values": 4, "scale": 1, "params": 1, "kv_len": 1, "qw": 1, "inv_freq": 1,
               "qoff": 1, "qeps": 1, "counter": 1, "ws": 1}),
    "norm_rope": dict(inputs=["x", "xv", "w", "inv_freq", "offset", "eps"], outputs=["out", "vout"],
                      defines=[("KV_PAIR", 1)],
                      dtypes={"inv_freq": mx.float32, "offset": mx.int32, "eps": mx.float32},
                      ndims={"x": 4, "xv": 4, "w": 1, "inv_freq": 1, "offset": 1, "eps": 1}),
    "norm_rope_qkv": dict(body="norm_rope", inputs=["x", "xk", "xv", "w", "wk", "inv_freq", "offset", "eps"],
                          outputs=["out", "kout", "vout"], defines=[("KV_PAIR", 0), ("QKV", 1)],
                          dtypes={"inv_freq": mx.float32, "offset": mx.int32, "eps": mx.float32},
                          ndims={"x": 4, "xk": 4, "xv": 4, "w": 1, "wk": 1, "inv_freq": 1, "offset": 1, "eps": 1}),
    "ple_combine": dict(inputs=["ids", "table", "proj", "w", "table_scale", "eps"], outputs=["out"],
                        dtypes={"ids": mx.int32, "table_scale": mx.float32, "eps": mx.float32},
                        ndims={"ids": 2, "table": 2, "proj": 4, "w": 1, "table_scale": 1, "eps": 1}),
    "ple_gate": dict(inputs=["gate", "pli"], outputs=["out"], dtypes={}, ndims={"gate": 3, "pli": 3}),
    "residual_norm": dict(inputs=["res", "branch", "w", "ls", "wn", "eps"], outputs=["out", "nrm"],
                          dtypes={"eps": mx.float32}, ndims={"res": 2, "branch": 2, "w": 1, "ls": 1, "wn": 1, "eps": 1}),
}
# qmv_close_gate with the product's and the gate's arrays each in one buffer (QPACK, GATE_QPACK)
KERNELS["qmv_close_gate_packed"] = dict(
    KERNELS["qmv_close_gate"], inputs=["x", "w", "res", "cw", "ls", "eps", "counter", "gw", "gz"],
    defines=KERNELS["qmv_close_gate"]["defines"] + [("QPACK", 1), ("GATE_QPACK", 1)])


def _with_close_params(spec: dict) -> dict:
    """A closing form's spec with the close's norm weights, layer scalar and eps in one float32 input
    (close_params.py)."""
    parts = ("cw", "ls", "cn", "eps")
    names = [n for n in spec["inputs"] if n not in parts]
    at = names.index("res") + 1
    return dict(spec, inputs=names[:at] + ["cp"] + names[at:], defines=spec["defines"] + [("CLOSE_PACKED", 1)],
                dtypes={**{k: v for k, v in spec["dtypes"].items() if k not in parts}, "cp": mx.float32},
                ndims={**{k: v for k, v in spec["ndims"].items() if k not in parts}, "cp": 1})


for _name in ("mv_close", "qmv_close", "qmv_close_gate_packed"):
    KERNELS[_name + "_cp"] = _with_close_params(KERNELS[_name])

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia.cu13 as cu  # the pip wheel's bin/ folder
        return str(Path(list(cu.__path__)[0]) / "bin" / "cuobjdump")
    except ImportError:
        sys.exit("cuobjdump not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def build(name: str, template: dict, arch: str = "sm_90") -> bytes:
    """The cubin our CUDA path builds for body ``name`` with ``template`` (T=bfloat16 unless given)."""
    template = dict(template)
    spec = KERNELS[name]
    inputs, outputs = spec["inputs"], spec["outputs"]
    body = spec.get("body", name)
    head, src = dispatch.kernel_source(body, "cuda", spec.get("defines", ()))
    k = cuda_build.CudaKernel(dispatch.kernel_name(body), inputs, outputs, src,
                              dispatch.read_source("cuda_types.h") + head)
    T = DTYPES[template.pop("T", "bfloat16")]
    # (other dtype parameters, such as norm_pair's W, by name too)
    tmpl = [("T", T)] + [(k_, DTYPES[v] if v in DTYPES else int(v)) for k_, v in template.items()]
    out_dtypes = [d or T for d in spec.get("out_dtypes", [spec.get("out_dtype", T)] * len(outputs))]
    source = k.full_source([spec["dtypes"].get(n, T) for n in inputs], [spec["ndims"].get(n, 2) for n in inputs],
                           out_dtypes, tmpl)
    return nvrtc.compile_source(source, arch=arch)


def _tool_output(cubin: bytes, flag: str) -> str:
    tool = _cuobjdump()
    env = {"PATH": str(Path(tool).parent) + ":/usr/bin:/bin"}  # cuobjdump runs nvdisasm from its folder
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, env=env).stdout


def resources(cubin: bytes) -> dict:
    """{"REG": registers per thread, "STACK": bytes of local memory per thread, ...}."""
    return {k: int(v) for k, v in re.findall(r"\b([A-Z]+(?:\[\d\])?):(\d+)", _tool_output(cubin, "-res-usage"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(KERNELS))
    ap.add_argument("--template", nargs="*", default=[], help="NAME=VALUE ...")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--sass", action="store_true")
    args = ap.parse_args()
    cubin = build(args.name, dict(t.split("=", 1) for t in args.template), args.arch)
    print(" ".join(f"{k}:{v}" for k, v in resources(cubin).items()))
    sass = _tool_output(cubin, "-sass")
    if args.sass:
        print(sass)
    # the hottest loop: the longest stretch a backward branch jumps over
    code = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines()
            for m in [re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)] if m]
    span = (0, -1)
    for at, op, line in code:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", line) if op == "BRA" else None
        if m and m.group(1) and int(m.group(1), 16) < at and at - int(m.group(1), 16) > span[1] - span[0]:
            span = (int(m.group(1), 16), at)
    loop = [op for at, op, _ in code if span[0] <= at <= span[1]]
    print(f"{len(code)} instructions; longest loop {len(loop)}:")
    for op, n in collections.Counter(o.split(".")[0] for o in loop).most_common(18):
        print(f"  {op:10s} {n}")


if __name__ == "__main__":
    main()
