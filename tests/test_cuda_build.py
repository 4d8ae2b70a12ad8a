"""Our CUDA kernel builds, on the CPU: every kernel body compiles with NVRTC (the same source the
GPU runs), compile errors carry NVRTC's log, cubins are kept on disk and reused.

NVRTC is a compiler library (pip's ``nvidia-cuda-nvrtc``, in the test extra on Linux): it needs no
GPU, so CI catches a CUDA compile error before any GPU run does. Running the cubins is the GPU
parity suite's job (tests/test_kernels.py on the device).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import pytest

import gemma4_mlx.kernels as K
from gemma4_mlx.kernels import cuda_build, dispatch, nvrtc

import kernel_cases

pytestmark = pytest.mark.skipif(not nvrtc.available(), reason="NVRTC not installed (pip install nvidia-cuda-nvrtc)")

_m = kernel_cases.MODULES
_cases = kernel_cases.cases


@pytest.fixture
def fresh_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "mlx"))  # seeding never writes outside the test
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "own")  # these tests look at our own builds; seeding below
    cuda_build.reset()
    dispatch.reset()
    yield tmp_path / "cache"
    cuda_build.reset()
    dispatch.reset()


def test_every_kernel_body_compiles_for_the_gpu(fresh_builds):
    with dispatch.force_backend("cuda"), cuda_build.prefetch():
        for kernel, args in _cases():
            outs = kernel(*args)
            assert all(isinstance(o, mx.array) for o in (outs if isinstance(outs, (list, tuple)) else [outs]))
    builds = list(cuda_build._builds.values())
    assert len(builds) >= 30
    failures = [str(f.exception())[:2000] for f in builds if f.exception() is not None]
    assert not failures, failures[0]
    assert all(len(f.result()) > 1000 for f in builds)  # cubins (ELF), not empty
    assert len(list(fresh_builds.rglob("*.cubin"))) == len(builds)


def test_every_kernel_body_compiles_when_seeding_mlx_cache(fresh_builds, tmp_path, monkeypatch):
    """The default on MLX 0.32 (GEMMA4_MLX_NVRTC=auto -> seed): every instantiation of every body
    lands in MLX's cache folder as a module MLX's cuda_kernel can load."""
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "auto")
    monkeypatch.setattr(cuda_build.mx, "__version__", "0.32.4")
    assert cuda_build.mode() == "seed"
    with dispatch.force_backend("cuda"), cuda_build.prefetch():
        for kernel, args in _cases():
            kernel(*args)
    futures = [f for k in dispatch._kernel_cache.values() if isinstance(k, cuda_build.SeededKernel)
               for f in k._seeded.values()]
    assert len(futures) >= 30
    failures = [str(f.exception())[:2000] for f in futures if f.exception() is not None]
    assert not failures, failures[0]
    modules = {f.result() for f in futures}
    assert all((tmp_path / "mlx" / f"{m}.ptx").stat().st_size > 1000 for m in modules)
    # an MLX version the seeding was not checked on gets our precompiled launches instead
    # (0.32.0 named a custom kernel's module without its source's hash)
    for version, expected in (("0.99.0", "own"), ("0.32.0", "own"), ("0.32.1", "seed"), ("0.33.0", "own")):
        monkeypatch.setattr(cuda_build.mx, "__version__", version)
        assert cuda_build.mode() == expected, version
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "seeded")  # a typo is named, not taken for another mode
    with pytest.raises(ValueError, match="GEMMA4_MLX_NVRTC='seeded'"):
        cuda_build.mode()


def test_a_compile_error_carries_the_nvrtc_log(fresh_builds):
    # a line every form compiles (the first cast is in the rows form's branch)
    broken = dispatch.body("ple_gate").replace("const float gl =", "const float gl = static_cats<float>(0) +", 1)
    with dispatch.force_backend("cuda"), dispatch.override_body("ple_gate", broken), cuda_build.prefetch():
        K.ple_gate_kernel(*_m["ple"]._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16")))
    (future,) = list(cuda_build._builds.values())
    err = future.exception()
    assert isinstance(err, nvrtc.NvrtcError) and "static_cats" in str(err) and "error" in str(err)


def test_cubins_come_back_from_the_disk_cache(fresh_builds, monkeypatch):
    source = 'extern "C" __global__ void k(float* y) { y[threadIdx.x] = 1.0f; }\n'
    first = cuda_build.cubin_future(source).result()
    files = list(fresh_builds.rglob("*.cubin"))
    assert len(files) == 1 and files[0].read_bytes() == first
    cuda_build.reset()

    def no_compiler(*a, **k):
        raise AssertionError("compiled again instead of reading the cache")

    monkeypatch.setattr(nvrtc, "compile_source", no_compiler)
    assert cuda_build.cubin_future(source).result() == first
    # an empty (torn) file is not trusted: it is rebuilt
    files[0].write_bytes(b"")
    cuda_build.reset()
    monkeypatch.undo()
    monkeypatch.setenv("GEMMA4_MLX_CACHE", str(fresh_builds))
    assert cuda_build.cubin_future(source).result() == first
    assert not list(fresh_builds.rglob("*.tmp"))


def test_the_generated_signature_passes_shapes_and_contiguous_strides():
    k = cuda_build.CudaKernel("gemma4_demo", ["x", "idx"], ["out"], "out[0] = x[x_strides[1]] + x_shape[0] + idx[0];",
                              dispatch.read_source("cuda_types.h") + dispatch.prelude("cuda")[0])
    src = k.full_source([mx.bfloat16, mx.int32], [3, 1], [mx.float32], [("T", mx.bfloat16), ("D", 256)])
    assert 'extern "C" __global__ void __launch_bounds__(K_TG) gemma4_demo(' in src
    assert "const bf16_t* __restrict__ x" in src and "float* __restrict__ out" in src
    assert "int x_shape_2" in src and "int x_strides_0" in src and "idx_shape" not in src
    assert "using T = bf16_t;" in src and "constexpr int D = 256;" in src
    nvrtc.compile_source(src, arch="sm_80")


@pytest.mark.parametrize("fused", [True, False], ids=["default", "attention apart"])
def test_prepare_at_load_starts_every_kernel_build_of_the_decode_step(fresh_builds, monkeypatch, fused):
    """The dry run at load names the step's kernels and starts their builds (nothing is launched);
    the first decode step's self-checks then find them built. By default the attention is one
    launch a layer (attention_fused, on since session 28); switched off, its two passes. The kernels
    only a fused form's fallback launches are not built (session 39: built only where that form fails
    its check)."""
    from gemma4_mlx import Model, decode, parse_config
    from gemma4_mlx.presets import preset_config

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    if not fused:
        monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", dispatch.DEFAULT_DISABLED["cuda"] + ",attention_fused")
    cfg = dict(preset_config("tiny"), hidden_size=128, head_dim=64, global_head_dim=128,
               hidden_size_per_layer_input=64, intermediate_size=256)
    model = Model(parse_config(cfg))
    with dispatch.force_backend("cuda"):
        decode.prepare(model)
    built = {src.split("void __launch_bounds__(K_TG) ")[1].split("(")[0] for src, _ in cuda_build._builds}
    # each form by its name before the lanes it reads and the rows it packs (the CUDA default since session 42:
    # gemma4_mlx/lanes.py), and before its close constants' mark
    names = {re.sub(r"(_cp)?(_x\d+_\d+)?(_rx?\d+_\d+)?(_rows\d+)?$", "", n) for n in built}
    assert any("_rows" in n for n in built) and any(re.search(r"_x\d+_\d+", n) for n in built), built
    # the writing layers' norms + RoPE over the joined q/k/v product (qkv_joined, on on CUDA since session 39),
    # the attention (fused, or both passes; "attention_prefix_q", on on CUDA since session 36, gives the KV-shared
    # layers' pass 1 the q norm), the PLE combine, the embedding, the float matvec's plain and gated forms (on
    # since session 20) and its closing forms (the sublayer closes in the o / down / PLE products' launches);
    # nothing switched off (the 4-bit matvec on float weights, the PLE tail)
    # (the fused form with its partials in the shared scratch, GEMMA4_MLX_ATTN_SCRATCH: on on CUDA since session 41)
    attention = {"gemma4_attention_partial_fused_scratch"} if fused else {"gemma4_attention_partial_plain",
                                                                          "gemma4_attention_combine"}
    assert {"gemma4_norm_rope_qkv_joined", "gemma4_ple_combine", "gemma4_embed", "gemma4_mv_bare", "gemma4_mv_gate",
            "gemma4_mv_close", "gemma4_mv_close_out"} | attention <= names, names
    # only the fallbacks of those: q / k-v norms apart (qkv_joined's, attention_prefix_q's), the PLE gate's own
    # launch (mv_gate's), the closes' own launch (mv_close's)
    assert not {"gemma4_norm_rope_q", "gemma4_norm_rope_kv", "gemma4_ple_gate", "gemma4_residual_norm"} & names, names
    other = {"gemma4_attention_partial_plain", "gemma4_attention_combine", "gemma4_attention_partial_fused",
             "gemma4_attention_partial_fused_scratch"} - attention
    assert not other & names, names
    assert not any(n.startswith(("gemma4_qmv", "gemma4_ple_tail")) for n in names), names
    assert all(f.result() for f in cuda_build._builds.values())


def test_seed_mode_writes_mlx_cache_entries_that_compile(fresh_builds, tmp_path, monkeypatch):
    """GEMMA4_MLX_NVRTC=seed: for each instantiation, MLX's cache folder gets the module MLX's
    cuda_kernel will look for (named by its generated source's std::hash) holding our build, and
    the .txt naming our function. (That MLX then finds and runs it is checked on the GPU.)"""
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "seed")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "mlx"))
    with dispatch.force_backend("cuda"), cuda_build.prefetch():
        K.ple_gate_kernel(*_m["ple"]._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16")))
        K.attention_kernel(*_m["attention"]._probe_inputs(("mlx.core.bfloat16", 256, 8, 1, False)))
    kernels = [k for k in dispatch._kernel_cache.values() if isinstance(k, cuda_build.SeededKernel)]
    assert len(kernels) == 3  # ple_gate, attention's two passes
    for k in kernels:
        for fut in k._seeded.values():
            module = fut.result()
            assert module.startswith("custom_kernel_gemma4_") and len(module.rsplit("_", 1)[1]) >= 8
            txt = (tmp_path / "mlx" / f"{module}.txt").read_text()
            name, symbol = txt.strip().split("\t")
            assert name == "mlx::core::cu::" + module.rsplit("_", 1)[0] and symbol.startswith("gemma4_seed_")
            assert len((tmp_path / "mlx" / f"{module}.ptx").read_bytes()) > 1000
    # the hash is the C++ library's: the same text, the same value, in every process
    assert cuda_build.std_hash("abc") == cuda_build.std_hash("abc") != cuda_build.std_hash("abd")


def test_seeded_modules_are_reused_only_when_they_hold_this_build(fresh_builds, tmp_path, monkeypatch):
    """A seeded module is kept while its .txt names the function of our current source; one left
    by another build of ours (another shared header or target) under the same MLX module name is
    built again, never launched under a name it does not contain."""
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "seed")
    probe = _m["ple"]._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16"))

    def seed_once():
        dispatch.reset()
        with dispatch.force_backend("cuda"), cuda_build.prefetch():
            K.ple_gate_kernel(*probe)
        (kernel,) = [k for k in dispatch._kernel_cache.values() if isinstance(k, cuda_build.SeededKernel)]
        (fut,) = kernel._seeded.values()
        return tmp_path / "mlx" / fut.result()

    module = seed_once()
    txt, ptx = module.with_suffix(".txt"), module.with_suffix(".ptx")
    listing, cubin = txt.read_text(), ptx.read_bytes()
    ptx.write_bytes(b"kept")  # a marker: reused means not rewritten
    seed_once()
    assert ptx.read_bytes() == b"kept" and txt.read_text() == listing
    txt.write_text(listing.replace("gemma4_seed_", "gemma4_seed_0ld"))  # another build's function name
    seed_once()
    assert txt.read_text() == listing and ptx.read_bytes() == cubin


def test_seeding_into_a_folder_that_cannot_be_written_is_not_an_error(fresh_builds, tmp_path, monkeypatch):
    """MLX's cache folder not writable (here: a file where the folder should be): the kernel is
    still launched through MLX, which then compiles it itself; nothing raises."""
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "seed")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(blocker / "ptx"))
    with dispatch.force_backend("cuda"), cuda_build.prefetch():
        K.ple_gate_kernel(*_m["ple"]._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16")))
    (kernel,) = [k for k in dispatch._kernel_cache.values() if isinstance(k, cuda_build.SeededKernel)]
    (fut,) = kernel._seeded.values()
    assert fut.exception() is None and fut.result().startswith("custom_kernel_gemma4_ple_gate")


def _expand_includes(text: str) -> str:
    """``text`` with each ``#include "PATH"`` line replaced by that file's content."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith('#include "'):
            out.append(Path(line.split('"')[1]).read_text())
        else:
            out.append(line)
    return "".join(out)


def test_short_sources_give_mlx_include_lines_for_every_kernel(fresh_builds, tmp_path, monkeypatch):
    """GEMMA4_MLX_SHORT_SOURCES=1: MLX gets a few include lines per kernel instead of its header and
    body (MLX hashes the source it generates at every launch); they name the same shape/stride
    parameters, include exactly our text, compile with NVRTC, and the module seeded is the one MLX
    names after the short source."""
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "seed")
    monkeypatch.setenv(cuda_build.SHORT_SOURCES_ENV, "1")
    with dispatch.force_backend("cuda"), cuda_build.prefetch():
        for kernel, args in _cases():
            kernel(*args)
    kernels = [k for k in dispatch._kernel_cache.values() if isinstance(k, cuda_build.SeededKernel)]
    assert len(kernels) >= 10 and all(k.short for k in kernels)
    for k in kernels:
        header, body = k.given_sources()
        assert (header, body) != (k.header, k.source) and len(header) + len(body) < 600, k.name
        assert _expand_includes(header) == k.header
        assert _expand_includes(body).split("\n", 1)[1] == k.source, k.name
        assert cuda_build.shape_uses(body, k.input_names) == k._uses
        for fut in k._seeded.values():
            module = fut.result()
            assert (tmp_path / "mlx" / f"{module}.ptx").stat().st_size > 1000
    # the seeded name is MLX's for the short source, and that source is a fraction of the full one
    k = next(k for k in kernels if "attention_partial" in k.name)
    (key, fut), = list(k._seeded.items())[:1]
    inputs = [mx.zeros((1,) * nd, dtype=dt) for dt, nd in key[0]]
    kname = cuda_build.mlx_kernel_name(k.name, key[2])
    short = cuda_build.mlx_source(kname, *k.given_sources(), k.input_names, inputs, k.output_names, list(key[1]),
                                  list(key[2]), k._uses)
    full = cuda_build.mlx_source(kname, k.header, k.source, k.input_names, inputs, k.output_names, list(key[1]),
                                 list(key[2]), k._uses)
    assert fut.result() == f"{kname}_{cuda_build.std_hash(short):x}"
    assert len(short) * 5 < len(full)
    # were MLX to compile the short form itself, NVRTC would read the same code from the files
    symbol = "short_form_check"
    own = cuda_build.SeededKernel(k.name, k.input_names, k.output_names, k.given_sources()[1],
                                  k.given_sources()[0], dispatch.read_source("cuda_types.h") + k.given_sources()[0],
                                  k.ensure_row_contiguous)
    assert own._uses == k._uses
    cubin = nvrtc.compile_source(own.our_source(symbol, inputs, list(key[1]), list(key[2])), arch="sm_90")
    assert len(cubin) > 1000


@pytest.mark.parametrize("where", ["a file where the folder should be", "a quote in the path"])
def test_short_sources_fall_back_to_the_full_text_where_files_cannot_be_included(fresh_builds, tmp_path,
                                                                                  monkeypatch, where):
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "seed")
    monkeypatch.setenv(cuda_build.SHORT_SOURCES_ENV, "1")
    if where.startswith("a file"):
        blocker = tmp_path / "blocked"
        blocker.write_text("")
        monkeypatch.setenv("GEMMA4_MLX_CACHE", str(blocker / "cache"))
    else:
        monkeypatch.setenv("GEMMA4_MLX_CACHE", str(tmp_path / 'say "cheese"'))
    with dispatch.force_backend("cuda"), cuda_build.prefetch():
        K.ple_gate_kernel(*_m["ple"]._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16")))
    (kernel,) = [k for k in dispatch._kernel_cache.values() if isinstance(k, cuda_build.SeededKernel)]
    assert kernel.given_sources() == (kernel.header, kernel.source)


def test_short_sources_switch_is_part_of_the_kernel_and_step_keys(fresh_builds, monkeypatch):
    from gemma4_mlx import decode

    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "seed")
    monkeypatch.delenv(cuda_build.SHORT_SOURCES_ENV, raising=False)
    assert cuda_build.short_sources()  # the default
    monkeypatch.setenv(cuda_build.SHORT_SOURCES_ENV, "0")
    with dispatch.force_backend("cuda"):
        full, step = dispatch.get_kernel("ple_gate", ["gate", "pli"], ["out"]), decode._switches()
        monkeypatch.setenv(cuda_build.SHORT_SOURCES_ENV, "1")
        short = dispatch.get_kernel("ple_gate", ["gate", "pli"], ["out"])
        assert short is not full and short.short and not full.short
        assert decode._switches() != step


def test_short_sources_include_absolute_paths_under_a_relative_cache_setting(fresh_builds, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_MLX_NVRTC", "seed")
    monkeypatch.setenv(cuda_build.SHORT_SOURCES_ENV, "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEMMA4_MLX_CACHE", "relative-cache")
    with dispatch.force_backend("cuda"), cuda_build.prefetch():
        K.ple_gate_kernel(*_m["ple"]._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16")))
    (kernel,) = [k for k in dispatch._kernel_cache.values() if isinstance(k, cuda_build.SeededKernel)]
    header, body = kernel.given_sources()
    for text in (header, body):
        path = Path(text.split('#include "')[1].split('"')[0])
        assert path.is_absolute() and path.is_file() and str(tmp_path / "relative-cache") in str(path)


def test_a_build_lands_in_the_cache_folder_of_its_request(fresh_builds, tmp_path, monkeypatch):
    """A build runs on a pool thread, maybe after the caller's working folder or setting changed
    (a test's monkeypatch undone: session 15 found a cubin from a relative-cache test committed in
    the repository): the cubin goes where the cache was when the build was asked for."""
    from concurrent.futures import Future

    queued = []

    class Deferred:  # runs nothing until told: the pool thread that gets to it late
        def submit(self, fn, *args):
            fut = Future()
            queued.append((fut, fn, args))
            return fut

    monkeypatch.setattr(cuda_build, "_submit", Deferred().submit)  # (not waited for by the tests' env writes)
    asked, later = tmp_path / "asked", tmp_path / "later"
    asked.mkdir()
    later.mkdir()
    monkeypatch.chdir(asked)
    monkeypatch.setenv("GEMMA4_MLX_CACHE", "relative-cache")
    source = 'extern "C" __global__ void k(float* y) { y[0] = 1.0f; }\n'
    fut = cuda_build.cubin_future(source)
    monkeypatch.chdir(later)
    monkeypatch.setenv("GEMMA4_MLX_CACHE", str(tmp_path / "other"))
    (pending, fn, args), = queued
    pending.set_result(fn(*args))
    assert fut.result()
    assert list((asked / "relative-cache").rglob("*.cubin")) and not list(later.rglob("*"))
    assert not (tmp_path / "other").exists()


def test_wait_for_builds_returns_once_every_build_asked_for_has_finished(fresh_builds, monkeypatch):
    """The tests' teardown waits here before it writes the environment (NVRTC reads it meanwhile)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(cuda_build, "_executor", lambda: pool)
    monkeypatch.setattr(cuda_build, "_build", lambda source, arch, folder: release.wait(30) and b"cubin")
    fut = cuda_build.cubin_future('extern "C" __global__ void k() {}\n')
    try:
        assert cuda_build.wait_for_builds(timeout=0.2) is False and not fut.done()
    finally:
        release.set()
    assert cuda_build.wait_for_builds(timeout=30) is True and fut.result() == b"cubin"
    assert not cuda_build._in_flight
    pool.shutdown()


@pytest.mark.parametrize("mode", ["own", "seed"])
def test_a_failed_build_keeps_nothing_of_its_callers_alive(fresh_builds, monkeypatch, mode):
    """A failed build stays in its future for good; raised to each caller as a fresh exception, it does not take the
    caller's stack into its traceback (session 46 on the GPU: a kernel that did not build kept a deleted model's
    weights alive, through the frames of the step that had asked for it)."""
    import gc
    import weakref

    monkeypatch.setenv("GEMMA4_MLX_NVRTC", mode)
    monkeypatch.setattr(cuda_build.mx, "__version__", "0.32.4")
    broken = dispatch.body("ple_gate").replace("const float gl =", "const float gl = static_cats<float>(0) +", 1)

    class Model:  # what a caller's frame holds while the kernel is asked for
        pass

    def caller(model):
        K.ple_gate_kernel(*_m["ple"]._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16")))

    with dispatch.force_backend("cuda"), dispatch.override_body("ple_gate", broken):
        refs = []
        for _ in range(2):  # the second caller meets the stored failure
            model = Model()
            refs.append(weakref.ref(model))
            with pytest.raises(nvrtc.NvrtcError, match="static_cats"):
                caller(model)
            del model
        gc.collect()  # (inside: leaving the override drops the seeded kernel and its futures)
        assert [r() for r in refs] == [None, None]
