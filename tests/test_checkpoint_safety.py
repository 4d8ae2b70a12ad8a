"""No input loses data or reads through the checkpoint folder (issue 13, checkpoint side).

* Writing (`convert`, `init`): an output that is, contains or lies inside the input is refused
  whatever alias names it; `--force` replaces only a checkpoint folder, in one atomic exchange;
  SIGTERM and kills leave neither a missing destination nor temporary folders behind.
* Reading: only regular files inside the checkpoint folder; errors never quote file contents;
  stored dtypes match what the model expects; config sizes are refused before anything is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest

from gemma4_mlx import load, load_model
from gemma4_mlx.checkpoint import CheckpointError, convert_checkpoint, write_random_checkpoint
from gemma4_mlx.checkpoint import output
from gemma4_mlx.errors import LoadError
from gemma4_mlx.presets import preset_config
from cli_harness import invoke as _cli, no_debug  # noqa: F401  (no_debug: autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"s3cr3t:*:21234567890:0:99999:7:::\n" * 4  # what /etc/shadow looks like


def _one_line(r, *needles):
    assert r.exit_code == 1, (r.exit_code, r.output)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _litter(parent: Path):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_random_checkpoint("tiny-31b", tmp_path_factory.mktemp("good") / "ck", dtype="float32")


@pytest.fixture
def src(good, tmp_path) -> Path:
    dst = tmp_path / "models" / "src"
    shutil.copytree(good, dst)
    (tmp_path / "models" / "notes.txt").write_text("a sibling of the source")
    return dst


# --- writing: outputs that alias the input --------------------------------------------------------
@pytest.mark.parametrize("alias", ["dotdot", "symlink", "parent", "inside", "same"])
def test_convert_refuses_outputs_that_alias_the_source(src, tmp_path, alias):
    before, parent_before = _digest(src), _digest(src.parent)
    if alias == "dotdot":
        out = src.parent / "x" / ".." / "src"
    elif alias == "symlink":
        out = tmp_path / "link"
        out.symlink_to(src, target_is_directory=True)
    elif alias == "parent":
        out = src.parent
    elif alias == "inside":
        out = src / "converted"
    else:
        out = src
    needle = {"parent": "contains the input", "inside": "inside the input"}.get(alias, "is the input")
    r = _cli(["convert", "--hf-path", src, "--mlx-path", out, "--force", "--quiet", "-q"])
    _one_line(r, needle)
    assert _digest(src) == before and _digest(src.parent) == parent_before
    assert not _litter(src.parent) and not _litter(tmp_path)


def test_convert_refuses_an_output_holding_the_hub_cache_blobs(good, tmp_path):
    """A Hub cache snapshot links its files into blobs/: loading reads through the links, and an
    output folder holding the blobs (the source's real data) is refused."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in good.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    load_model(snap)  # links into the repo's blobs are inside the checkpoint
    before = _digest(repo / "blobs")
    for out in (repo / "blobs", repo):
        _one_line(_cli(["convert", "--hf-path", snap, "--mlx-path", out, "--force", "--quiet"]), "contains the input")
    assert _digest(repo / "blobs") == before
    r = _cli(["convert", "--hf-path", snap, "--mlx-path", tmp_path / "out", "--quiet"])
    assert r.exit_code == 0, r.output
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())  # contents copied, not links


def test_force_replaces_only_checkpoint_folders(good, tmp_path, monkeypatch):
    holder = tmp_path / "projects"
    (holder / "repo").mkdir(parents=True)
    (holder / "file.txt").write_text("keep me")
    _one_line(_cli(["init", "--preset", "tiny", "--out", holder, "--force", "-q"]), "holds subfolders")
    assert (holder / "file.txt").read_text() == "keep me" and (holder / "repo").is_dir()
    work = tmp_path / "work"
    shutil.copytree(good, work)
    monkeypatch.chdir(work)
    _one_line(_cli(["init", "--preset", "tiny", "--out", ".", "--force", "-q"]), "working directory")
    with pytest.raises(CheckpointError, match="home folder"):
        output.check_destination(Path.home(), force=True)


def test_force_through_a_symlink_replaces_the_real_folder(good, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(good, real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    out = write_random_checkpoint("tiny", link, dtype="float32", seed=5, force=True)
    assert out == real and link.is_symlink() and json.loads((real / "config.json").read_text())["hidden_size"] == 64
    assert load_model(link).args.num_hidden_layers == 6
    assert not _litter(tmp_path)


# --- writing: the swap and kills -------------------------------------------------------------------
def test_force_swap_is_one_exchange(good, tmp_path, monkeypatch):
    """The old folder is never moved away from the destination: the new one is exchanged with it."""
    dest = tmp_path / "ck"
    shutil.copytree(good, dest)
    seen = []
    real_exchange, real_replace = output._exchange, os.replace

    def exchange(a, b):
        ok = real_exchange(a, b)
        seen.append(("exchange", Path(b), ok))
        return ok

    def replace(a, b):
        assert Path(a) != dest, "the destination was renamed away"
        return real_replace(a, b)

    monkeypatch.setattr(output, "_exchange", exchange)
    monkeypatch.setattr(output.os, "replace", replace)
    write_random_checkpoint("tiny", dest, dtype="float32", force=True)
    assert seen == [("exchange", dest, True)]
    assert load_model(dest).args.num_hidden_layers == 6 and not _litter(tmp_path)


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_sigterm_while_writing_leaves_the_old_folder_and_no_temp(good, tmp_path):
    dest = tmp_path / "ck"
    shutil.copytree(good, dest)
    before = _digest(dest)
    r = _run_python(f"""
        import os, signal
        from gemma4_mlx.checkpoint import write_random_checkpoint
        calls = []
        def progress(done, total, name):
            calls.append(name)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        write_random_checkpoint("tiny", {str(dest)!r}, force=True, progress=progress)
        print("not terminated")
    """)
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stdout, r.stderr[-2000:])
    assert _digest(dest) == before and not _litter(tmp_path)


def test_kill_after_the_exchange_leaves_the_new_folder_and_the_next_run_cleans_up(good, tmp_path):
    dest = tmp_path / "ck"
    shutil.copytree(good, dest)
    r = _run_python(f"""
        import os
        from gemma4_mlx.checkpoint import output, write_random_checkpoint
        output._remove = lambda path: os._exit(9)  # SIGKILL right after the swap
        write_random_checkpoint("tiny", {str(dest)!r}, dtype="float32", force=True)
    """)
    assert r.returncode == 9, r.stderr[-2000:]
    assert load_model(dest).args.num_hidden_layers == 6  # the new, complete checkpoint
    assert len(_litter(tmp_path)) == 1  # the old one, under a dead writer's temp name
    write_random_checkpoint("tiny", tmp_path / "other", dtype="float32")
    assert len(_litter(tmp_path)) == 1  # only the same target's writers clean up
    write_random_checkpoint("tiny", dest, dtype="float32", seed=1, force=True)
    assert not _litter(tmp_path)


def test_without_exchange_a_kill_between_renames_is_undone_by_the_next_run(good, tmp_path):
    """File systems without an atomic exchange: the old folder goes aside for an instant; a SIGKILL
    exactly there strands it, and the next run that writes the target puts it back first."""
    dest = tmp_path / "ck"
    shutil.copytree(good, dest)
    before = _digest(dest)
    r = _run_python(f"""
        import os
        from gemma4_mlx.checkpoint import output, write_random_checkpoint
        output._exchange = lambda a, b: False
        real = os.replace
        def replace(a, b):
            if ".old-" in str(b):
                real(a, b)
                os._exit(9)
            return real(a, b)
        output.os.replace = replace
        write_random_checkpoint("tiny", {str(dest)!r}, dtype="float32", force=True)
    """)
    assert r.returncode == 9, r.stderr[-2000:]
    assert not dest.exists() and len(_litter(tmp_path)) == 2  # .old- (the old folder) and .tmp- (the new)
    with pytest.raises(CheckpointError, match="already exists"):  # restored first, so it is not replaced
        write_random_checkpoint("tiny", dest)
    assert _digest(dest) == before and not _litter(tmp_path)


def test_signals_are_blocked_between_the_fallback_renames(good, tmp_path, monkeypatch):
    dest = tmp_path / "ck"
    shutil.copytree(good, dest)
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    blocked = []
    real = os.replace

    def replace(a, b):
        blocked.append(signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return real(a, b)

    monkeypatch.setattr(output.os, "replace", replace)
    write_random_checkpoint("tiny", dest, dtype="float32", force=True)
    assert blocked == [True, True] and not _litter(tmp_path)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_stale_temp_folders_of_live_writers_are_left_alone(tmp_path):
    dest = tmp_path / "ck"
    live = tmp_path / f".ck.tmp-{os.getppid()}-0123abcd"
    dead = tmp_path / ".ck.tmp-999999999-0123abcd"
    old_style = tmp_path / ".ck.tmp-89abcdef"
    unrelated = tmp_path / ".ck.tmp-notours"
    for d in (live, dead, old_style, unrelated):
        d.mkdir()
    write_random_checkpoint("tiny", dest)
    assert live.is_dir() and unrelated.is_dir() and not dead.exists() and not old_style.exists()


# --- reading: only regular files inside the folder -------------------------------------------------
@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (a FIFO read would block forever)."""
    def fail(*_):
        raise AssertionError(f"still running after {seconds} s: a read blocked")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def sharded(tmp_path) -> Path:
    return write_random_checkpoint("tiny-31b", tmp_path / "sharded", dtype="float32", max_shard_bytes=100_000)


def _set_shard(ck: Path, shard: object) -> None:
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = shard
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shard,needle", [
    ("/etc/shadow", "not a file name inside the checkpoint folder"),
    ("../../../../etc/passwd", "not a file name inside the checkpoint folder"),
    ("../outside.safetensors", "not a file name inside the checkpoint folder"),
    ("", "not a file name inside the checkpoint folder"),
    (7, "weight_map must map tensor names to shard file names"),
])
def test_index_shards_outside_the_folder_are_refused(sharded, tmp_path, shard, needle):
    (tmp_path / "outside.safetensors").write_bytes(SECRET)
    _set_shard(sharded, shard)
    line = _one_line(_cli(["convert", "--hf-path", sharded, "--mlx-path", tmp_path / "out", "--quiet"]), needle)
    assert "s3cr3t" not in line
    with pytest.raises(LoadError, match=needle):
        load_model(sharded)


@pytest.mark.parametrize("weight_map", [["model-00001-of-00002.safetensors"], {"a": 1}, {}, "x", None])
def test_index_weight_map_of_the_wrong_shape(sharded, tmp_path, weight_map):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    r = _cli(["convert", "--hf-path", sharded, "--mlx-path", tmp_path / "out", "--quiet"])
    _one_line(r, "model.safetensors.index.json", "weight_map must map tensor names to shard file names")


def test_shard_symlinked_outside_the_folder(sharded, tmp_path):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(SECRET)
    name = sorted(sharded.glob("model-*.safetensors"))[0]
    name.unlink()
    name.symlink_to(secret)
    line = _one_line(_cli(["convert", "--hf-path", sharded, "--mlx-path", tmp_path / "out", "--quiet"]),
                     name.name, "links to outside the checkpoint folder")
    assert "s3cr3t" not in line


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "tokenizer.json",
                                    "model.safetensors.index.json"])
def test_fifo_or_folder_in_place_of_a_file_fails_fast(good, tmp_path, target):
    for kind in ("fifo", "dir"):
        ck = tmp_path / f"ck-{kind}"
        shutil.copytree(good, ck)
        path = ck / target
        path.unlink(missing_ok=True)
        os.mkfifo(path) if kind == "fifo" else path.mkdir()
        with _deadline(60):
            with pytest.raises(LoadError) as e:
                load(ck)
        assert target in str(e.value) and "not a regular file" in str(e.value), str(e.value)


def test_single_weight_file_linked_outside(good, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(good, ck)
    (tmp_path / "shadow").write_bytes(SECRET)
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").symlink_to(tmp_path / "shadow")
    (ck / "config.json").unlink()
    (ck / "config.json").symlink_to(tmp_path / "shadow")
    with pytest.raises(LoadError, match="config.json: links to outside the checkpoint folder"):
        load_model(ck)


def test_errors_never_quote_file_contents(good, tmp_path):
    """A text file posing as the weights: no header length (its first 8 bytes) and no text in the error."""
    ck = tmp_path / "ck"
    shutil.copytree(good, ck)
    (ck / "model.safetensors").write_bytes(SECRET)
    (length,) = struct.unpack("<Q", SECRET[:8])
    r = _cli(["convert", "--hf-path", ck, "--mlx-path", tmp_path / "out", "--quiet"])
    line = _one_line(r, "model.safetensors", "corrupt")
    assert str(length) not in line and "s3cr3t" not in line and "99999" not in line
    (ck / "config.json").write_bytes(b"\xff" + SECRET)
    line = _one_line(_cli(["info", "--model", ck]), "config.json", "not valid JSON")
    assert "s3cr3t" not in line and "\\xff" not in line


# --- reading: dtypes -------------------------------------------------------------------------------
def _retype(path: Path, name_part: str, dtype) -> str:
    weights = dict(mx.load(str(path)))
    name = next(k for k in sorted(weights) if name_part in k)
    weights[name] = weights[name].astype(dtype)
    mx.save_safetensors(str(path), weights, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("dtype", [mx.int16, mx.int32, mx.uint8, mx.bool_])
def test_integer_weights_in_a_float_model_are_refused(good, tmp_path, dtype):
    ck = tmp_path / "ck"
    shutil.copytree(good, ck)
    name = _retype(ck / "model.safetensors", "q_proj.weight", dtype)
    with pytest.raises(LoadError, match=f"{name} is stored as {str(dtype).split('.')[-1]}, but the model expects "
                                        "float16, bfloat16 or float32"):
        load_model(ck)


def test_quantized_weights_keep_their_exact_integer_type(tmp_path):
    src = write_random_checkpoint("tiny-31b", tmp_path / "src", dtype="float32")
    q = convert_checkpoint(src, tmp_path / "q4", quantize=True)
    load_model(q)  # uint32 weights with float scales and biases load
    name = _retype(q / "model.safetensors", "q_proj.weight", mx.int32)
    with pytest.raises(LoadError, match=f"{name} is stored as int32, but the quantized layer expects uint32"):
        load_model(q)


# --- reading: config sizes -------------------------------------------------------------------------
@pytest.fixture
def huge(good, tmp_path):
    def make(with_layer_types: bool) -> Path:
        ck = tmp_path / f"huge-{with_layer_types}"
        shutil.copytree(good, ck)
        cfg = json.loads((ck / "config.json").read_text())
        cfg["num_hidden_layers"] = 200_000
        if with_layer_types:
            cfg["layer_types"] = (["sliding_attention"] * 4 + ["full_attention"]) * 40_000
        else:
            cfg.pop("layer_types", None)
        (ck / "config.json").write_text(json.dumps(cfg))
        return ck
    return make


@pytest.mark.parametrize("with_layer_types", [True, False])
def test_a_config_with_200k_layers_is_refused_at_once(huge, with_layer_types):
    ck = huge(with_layer_types)
    needle = "num_hidden_layers' is 200000, above this loader's limit of 1024 (16x the largest published"
    for run in (lambda: load_model(ck), lambda: load(ck)):
        t = time.perf_counter()
        with pytest.raises(LoadError, match=needle.replace("(", r"\(")):
            run()
        assert time.perf_counter() - t < 2.0
    t = time.perf_counter()
    _one_line(_cli(["info", "--model", ck]), needle)
    _one_line(_cli(["generate", "--model", ck, "--prompt", "hi", "--max-tokens", "1"]), needle)
    assert time.perf_counter() - t < 10.0


def test_init_refuses_oversized_configs(tmp_path):
    cfg = preset_config("tiny")
    for key, value in (("num_hidden_layers", 200_000), ("vocab_size", 10**7), ("hidden_size", 10**6)):
        bad = dict(cfg, **{key: value})
        bad.pop("layer_types", None)
        t = time.perf_counter()
        with pytest.raises(Exception, match=f"{key}' is {value}, above this loader's limit"):
            write_random_checkpoint(bad, tmp_path / key)
        assert time.perf_counter() - t < 2.0 and not (tmp_path / key).exists()


def test_init_refuses_what_the_disk_cannot_hold(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(CheckpointError, match="GiB free"):
        write_random_checkpoint("tiny", tmp_path / "ck")
    assert not (tmp_path / "ck").exists() and not _litter(tmp_path)
