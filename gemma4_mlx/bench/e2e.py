"""End to end, as a user meets it: ``mlx_lm.generate`` against ``gemma4-mlx generate``, each
command in a fresh process on the same checkpoint (``gemma4-mlx compare --e2e``).

The warm harness (:mod:`.run`) times both models in one process after a warm-up; a user runs one
command, and everything before the first token counts: the interpreter, imports, loading, kernel
builds, traces. Here:

* **One checkpoint on disk.** ``--model PATH`` as is, or a preset written once with the
  project's writer (:func:`~gemma4_mlx.checkpoint.write_random_checkpoint`, bf16 by default, with
  a Gemma 4 tokenizer) into a reusable work folder, quantized with
  :func:`~gemma4_mlx.checkpoint.convert_checkpoint` for ``-q 4|8``. A folder is reused only if the
  record beside it (``<folder>.e2e.json``, written last) matches and every file it lists is there
  with its size.
* **The commands as typed.** The same raw prompt text on both sides (about ``--prompt-tokens``
  tokens, counted with the checkpoint's tokenizer), chat template off, greedy::

      mlx_lm.generate --model DIR --prompt TEXT --max-tokens N --temp 0 --ignore-chat-template
      gemma4-mlx generate --model DIR --prompt TEXT --max-tokens N --temp 0 --no-chat-template

  each under the shim :mod:`.e2e_child`, which times them without changing them.
* **Cold, then warm.** Each side's first command gets empty kernel caches of its own
  (``MLX_PTX_CACHE_DIR``; ours also ``GEMMA4_MLX_CACHE``), kept for its later commands; that first
  run is reported apart ("first run on a fresh machine"), and ``--runs`` more per side and new-token
  count are alternated (stock, ours / ours, stock ...) and give the medians. The checkpoint's
  files are read once beforehand, so neither side's first run pays the disk for the other.

The results become tables, Markdown, a PNG and JSON in :mod:`.e2e_report`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import e2e_child
from .report import _jsonable
from .settings import BenchmarkError, on_gpu

SIDES = ("stock", "ours")  # the order of the first round; it swaps every round after
DTYPE_NAMES = ("bfloat16", "float16", "float32")
GPU_NEW_TOKENS = [128, 512, 2048]
CPU_NEW_TOKENS = [16, 64]
GPU_PROMPT_TOKENS = 402
CPU_PROMPT_TOKENS = 128  # MLX's CPU backend prefills e2b-mini at ~30-50 tok/s on 2 cores
GPU_PRESET, CPU_PRESET = "e2b", "e2b-mini"
DEFAULT_TIMEOUT_S = 600.0
QUANT_GROUP_SIZE = 64
ARGV_PROMPT_LIMIT = 100_000  # bytes; longer prompts go through stdin (--prompt -): Linux caps one argument at 128 KiB
STDERR_TAIL_LINES = 200
SAME_START_TOLERANCE = 1.05  # "a second fresh process starts no slower": within 5% (timing noise)
CACHE_VARS = {"mlx": "MLX_PTX_CACHE_DIR", "ours": "GEMMA4_MLX_CACHE"}

STOCK_COMMAND = "mlx_lm.generate"
OURS_COMMAND = "gemma4-mlx generate"
CHAT_OFF = {"stock": "--ignore-chat-template", "ours": "--no-chat-template"}

# key, label in tables, better
METRICS = [
    ("wall_s", "wall s", "lower"),
    ("load_s", "load s", "lower"),
    ("ttft_s", "TTFT s", "lower"),
    ("decode_tps", "decode tok/s", "higher"),
    ("gap_ratio", "worst / median gap", "lower"),
]
DETAIL_METRICS = [
    ("startup_s", "to the CLI's first statement s", "lower"),
    ("before_load_s", "to load() s", "lower"),
    ("ttft_after_load_s", "first token after load s", "lower"),
    ("gap_median_s", "median gap ms", "lower"),
    ("gap_max_s", "worst gap ms", "lower"),
    ("tokens_generated", "tokens generated", "-"),
    ("peak_memory_gb", "peak memory GB", "lower"),
]
ALL_METRICS = METRICS + DETAIL_METRICS


class E2EError(BenchmarkError):
    """An end-to-end run that cannot go on (one line, shown to the user)."""


@dataclass
class E2ESettings:
    preset: Optional[str] = None  # device default when neither preset nor model is given
    model: Optional[str] = None  # a checkpoint folder or Hub repo id, used as is
    dtype: str = "auto"  # a preset's checkpoint dtype (auto: bfloat16); with --model: convert to it
    quantize: Optional[int] = None  # 4 or 8: a quantized copy (group 64) in the work folder
    prompt_tokens: Optional[int] = None  # None: 402 on GPU, 128 on CPU
    new_tokens: Optional[List[int]] = None  # None: 128,512,2048 on GPU; 16,64 on CPU
    runs: Optional[int] = None  # warm runs per side and new-token count (None: 3 GPU, 2 CPU)
    seed: int = 0  # of a preset's random weights and of the prompt's wording
    work: Optional[str] = None  # None: ~/.cache/gemma4_mlx/e2e
    timeout: Optional[float] = None  # seconds per command (None: 600)

    def resolve(self) -> "E2ESettings":
        s = E2ESettings(**asdict(self))
        gpu = on_gpu()
        if s.model is not None and s.preset is not None:
            raise E2EError("give either --model or --preset, not both")
        if s.model is None and s.preset is None:
            s.preset = GPU_PRESET if gpu else CPU_PRESET
        if s.dtype not in ("auto", *DTYPE_NAMES):
            raise E2EError(f"unknown dtype {s.dtype!r}; choose from auto, {', '.join(DTYPE_NAMES)}")
        if s.dtype == "auto" and s.model is None:
            s.dtype = "bfloat16"
        if s.quantize not in (None, 4, 8):
            raise E2EError(f"--quantize must be 4 or 8, got {s.quantize}")
        if s.prompt_tokens is None:
            s.prompt_tokens = GPU_PROMPT_TOKENS if gpu else CPU_PROMPT_TOKENS
        if s.prompt_tokens < 2:
            raise E2EError("--prompt-tokens must be at least 2")
        if s.new_tokens is None:
            s.new_tokens = list(GPU_NEW_TOKENS if gpu else CPU_NEW_TOKENS)
        s.new_tokens = [int(n) for n in s.new_tokens]
        if not s.new_tokens or min(s.new_tokens) < 2:
            raise E2EError("--new-tokens must be at least 2 each (decode speed is timed after the first token)")
        if len(set(s.new_tokens)) != len(s.new_tokens):
            raise E2EError("--new-tokens lists a count twice")
        if s.runs is None:
            s.runs = 3 if gpu else 2
        if s.runs < 1:
            raise E2EError("--runs must be at least 1 (the first run on a fresh machine comes on top)")
        if s.work is None:
            s.work = str(default_work_dir())
        if s.timeout is None:
            s.timeout = DEFAULT_TIMEOUT_S
        if not s.timeout > 0:
            raise E2EError("--timeout must be positive (seconds per command)")
        return s


def default_work_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "gemma4_mlx" / "e2e"


# --- the checkpoint -------------------------------------------------------------------------------

def _record_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".e2e.json")


def _file_sizes(folder: Path) -> Dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def checkpoint_complete(folder: Path, spec: Dict[str, Any]) -> bool:
    """True when ``folder`` was written for ``spec`` and still holds every file it was written with."""
    try:
        rec = json.loads(_record_path(folder).read_text())
    except (OSError, ValueError):
        return False
    if rec.get("spec") != spec or not isinstance(rec.get("files"), dict) or not rec["files"]:
        return False
    for name, size in rec["files"].items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return "config.json" in rec["files"] and any(n.endswith(".safetensors") for n in rec["files"])


def _mark_complete(folder: Path, spec: Dict[str, Any]) -> None:
    rec = {"spec": spec, "files": _file_sizes(folder), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = _record_path(folder).with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, _record_path(folder))


def _make(folder: Path, spec: Dict[str, Any], write: Callable[[Path], Any], what: str,
          log: Callable[[str], None]) -> bool:
    """Write ``folder`` with ``write`` unless it is complete; True when it was reused."""
    if checkpoint_complete(folder, spec):
        log(f"reusing {what}: {folder}")
        return True
    log(f"writing {what} to {folder} ...")
    _record_path(folder).unlink(missing_ok=True)
    write(folder)
    _mark_complete(folder, spec)
    return False


def prepare_checkpoint(s: E2ESettings, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The checkpoint both commands load: ``{"path", "source", "reused", ...}``."""
    from ..checkpoint import convert_checkpoint, write_random_checkpoint
    from ..errors import CheckpointError, LoadError

    work = Path(s.work).expanduser()
    info: Dict[str, Any] = {"preset": s.preset, "model": s.model, "dtype": s.dtype, "quantize": s.quantize}
    try:
        work.mkdir(parents=True, exist_ok=True)
        if s.model is not None:
            from ..loading import resolve_model_path

            src = resolve_model_path(s.model)
            info["source"] = "checkpoint"
            if not s.quantize and s.dtype == "auto":
                info.update(path=str(src), reused=True, dtype=_stored_dtype(src))
                return info
            name = src.name + (f"-{s.dtype}" if s.dtype != "auto" else "") + (f"-q{s.quantize}" if s.quantize else "")
            spec = {"source": str(src), "source_files": _file_sizes(src), "dtype": s.dtype, "quantize": s.quantize,
                    "group_size": QUANT_GROUP_SIZE}
            folder = work / name
            info["reused"] = _make(folder, spec, lambda f: convert_checkpoint(
                src, f, dtype=None if s.dtype == "auto" else s.dtype, quantize=bool(s.quantize), q_bits=s.quantize,
                q_group_size=QUANT_GROUP_SIZE if s.quantize else None, force=True), "the converted checkpoint", log)
            info["path"] = str(folder)
            return info

        from ..presets import PRESETS

        if s.preset not in PRESETS:
            raise E2EError(f"unknown preset {s.preset!r}; choose from {', '.join(PRESETS)}")
        info["source"] = "preset"
        info["weights"] = f"random (write_random_checkpoint, seed {s.seed})"
        base = work / f"{s.preset}-{s.dtype}-seed{s.seed}"
        from ..checkpoint.random_weights import WEIGHTS_REVISION

        base_spec = {"preset": s.preset, "dtype": s.dtype, "seed": s.seed, "writer": "write_random_checkpoint",
                     "revision": WEIGHTS_REVISION}
        reused = _make(base, base_spec, lambda f: write_random_checkpoint(s.preset, f, dtype=s.dtype, seed=s.seed,
                                                                          force=True),
                       f"preset {s.preset} ({s.dtype})", log)
        folder = base
        if s.quantize:
            folder = work / f"{base.name}-q{s.quantize}"
            spec = {**base_spec, "quantize": s.quantize, "group_size": QUANT_GROUP_SIZE}
            reused = _make(folder, spec, lambda f: convert_checkpoint(
                base, f, quantize=True, q_bits=s.quantize, q_group_size=QUANT_GROUP_SIZE, force=True),
                f"its {s.quantize}-bit copy", log) and reused
        info.update(path=str(folder), reused=reused)
        return info
    except (CheckpointError, LoadError, OSError) as e:
        raise E2EError(f"cannot prepare the checkpoint: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    finally:
        _free_device_memory()


def _stored_dtype(folder: Path) -> str:
    """The dtype a checkpoint's config.json names (for titles and file names), else ``auto``."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for d in (config, text):
        for key in ("dtype", "torch_dtype"):
            if isinstance(d.get(key), str):
                return d[key]
    return "auto"


def _free_device_memory() -> None:
    """Converting ran the model in this process: give its buffers back before the commands run."""
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def warm_page_cache(folder: Path) -> int:
    """Read every file of the checkpoint once, so the first command does not pay the disk alone."""
    total = 0
    for p in sorted(Path(folder).iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


# --- the prompt -----------------------------------------------------------------------------------

SENTENCES = (
    "The morning train left the valley station a few minutes late.",
    "A light rain had fallen overnight, and the roads were still dark with it.",
    "Most of the passengers read, slept, or watched the wet fields go by.",
    "Near a window sat a woman sorting old letters into small piles.",
    "Each letter carried a date, the name of a town, and a line about the weather.",
    "The conductor walked slowly through the carriages, checking tickets by hand.",
    "Outside, the river followed the tracks for several miles before turning north.",
    "Farmers had begun to bring in the last of the autumn harvest.",
    "At the third stop a group of students climbed aboard with heavy bags.",
    "They argued about mathematics, music, and the price of coffee in the city.",
    "By noon the clouds had lifted and the hills were bright with sunlight.",
    "The woman finished her sorting and tied each pile with a length of string.",
)


def _words(seed: int):
    """An endless stream of words: the sentences above in an order that depends on ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    part = 0
    while True:
        part += 1
        yield f"Part {part}."
        for i in rng.permutation(len(SENTENCES)):
            yield from SENTENCES[i].split()


def build_prompt(encode: Callable[[str], Sequence[int]], n_tokens: int, seed: int = 0) -> Tuple[str, int]:
    """The longest text of whole words from :func:`_words` that encodes to at most ``n_tokens``
    tokens (special tokens included, as both commands encode a raw prompt); returns (text, count)."""
    words: List[str] = []
    gen = _words(seed)
    # Grow until over the target, then bisect on the number of words.
    while True:
        words.extend(next(gen) for _ in range(max(8, len(words))))
        if len(encode(" ".join(words))) > n_tokens:
            break
    lo, hi = 1, len(words)  # encode(words[:lo]) fits (or nothing does), words[:hi] does not
    if len(encode(words[0])) > n_tokens:
        raise E2EError(f"--prompt-tokens {n_tokens} is too short for one word")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(encode(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid
    text = " ".join(words[:lo])
    return text, len(encode(text))


def load_encoder(model_dir: str) -> Callable[[str], Sequence[int]]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(Path(model_dir))
    return lambda text: tok.encode(text)


# --- one command ----------------------------------------------------------------------------------

def command_args(side: str, model_dir: str, prompt: str, new_tokens: int) -> Tuple[List[str], bool]:
    """The side's generate arguments (after the command name) and whether the prompt goes to stdin."""
    via_stdin = len(prompt.encode("utf-8")) > ARGV_PROMPT_LIMIT
    args = ["--model", model_dir, "--prompt", "-" if via_stdin else prompt, "--max-tokens", str(new_tokens),
            "--temp", "0", CHAT_OFF[side]]
    return args, via_stdin


def display_command(side: str, args: Sequence[str], prompt_tokens: int) -> str:
    """The command as a user types it, with the prompt shortened to ``'<N-token prompt>'``."""
    shown = [f"'<{prompt_tokens}-token prompt>'" if i and args[i - 1] == "--prompt" and a != "-" else a
             for i, a in enumerate(args)]
    return " ".join([STOCK_COMMAND if side == "stock" else OURS_COMMAND, *shown])


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.is_dir() else 0


def _modules(folder: Path) -> List[str]:
    """The kernel modules a cache folder holds (MLX's: one ``.ptx`` each, named after the kernel
    and its source's hash): which kernels a first run had to compile."""
    return sorted(p.stem for p in folder.rglob("*.ptx")) if folder.is_dir() else []


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


@dataclass
class RunSpec:
    """One command to run: which side, how many new tokens, which kernel caches, cold or not."""

    side: str
    new_tokens: int
    round: int
    cold: bool
    caches: Dict[str, str]


class CommandRunner:
    """Spawns one side's command under the shim and turns its record into one run's numbers."""

    def __init__(self, model_dir: str, prompt: str, prompt_tokens: int, timeout: float, logs: Path,
                 failures: Path, python: str = sys.executable):
        self.model_dir, self.prompt, self.prompt_tokens = model_dir, prompt, prompt_tokens
        self.timeout, self.logs, self.failures, self.python = timeout, logs, failures, python
        self.count = 0

    def argv(self, side: str, new_tokens: int) -> Tuple[List[str], bool]:
        args, via_stdin = command_args(side, self.model_dir, self.prompt, new_tokens)
        return [self.python, e2e_child.__file__, side, *args], via_stdin

    def env(self, spec: RunSpec, record: Path) -> Dict[str, str]:
        env = dict(os.environ)
        # Run from a source tree (a checkout on PYTHONPATH, `python -m bench.compare`), both sides
        # import this very tree; an installed package is found by the interpreter itself.
        root = Path(__file__).resolve().parents[2]
        if (root / "pyproject.toml").is_file():
            env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env[CACHE_VARS["mlx"]] = spec.caches[CACHE_VARS["mlx"]]
        env[CACHE_VARS["ours"]] = spec.caches[CACHE_VARS["ours"]]
        env[e2e_child.RECORD_ENV] = str(record)
        return env

    def __call__(self, spec: RunSpec) -> Dict[str, Any]:
        self.count += 1
        stem = f"{self.count:03d}-{spec.side}-{spec.new_tokens}"
        record, out_path, err_path = (self.logs / f"{stem}.json", self.logs / f"{stem}.stdout",
                                      self.logs / f"{stem}.stderr")
        argv, via_stdin = self.argv(spec.side, spec.new_tokens)
        shown = display_command(spec.side, argv[3:], self.prompt_tokens)
        env = self.env(spec, record)
        empty_before = all(_count_files(Path(p)) == 0 for p in spec.caches.values())
        stdin = subprocess.PIPE if via_stdin else subprocess.DEVNULL
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            env[e2e_child.SPAWN_ENV] = repr(time.time())
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=err, env=env, start_new_session=True)
            try:
                proc.communicate(self.prompt.encode("utf-8") if via_stdin else None, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                self._fail(spec, shown, err_path, f"timed out after {self.timeout:g} s")
            except BaseException:
                _kill(proc)
                raise
            wall = time.perf_counter() - t0
        rc = proc.returncode
        if rc != 0:
            self._fail(spec, shown, err_path, f"exited with status {rc}" if rc > 0 else f"was killed by signal {-rc}")
        try:
            rec = json.loads(record.read_text())
        except (OSError, ValueError):
            self._fail(spec, shown, err_path, "exited without the shim's record")
        if not rec.get("load_calls") or not rec.get("stream_calls"):
            self._fail(spec, shown, err_path, "ran, but the shim saw no load or no stream_generate call "
                       "(the command no longer looks them up where e2e_child patches them)")
        if not rec.get("tokens_generated"):
            self._fail(spec, shown, err_path, "generated no token")
        numbers = run_numbers(rec, wall, spec, shown, empty_before)
        numbers["stderr_tail"] = _tail(err_path, lines=4)
        return numbers

    def _fail(self, spec: RunSpec, shown: str, err_path: Path, what: str) -> None:
        tail = _tail(err_path)
        self.failures.mkdir(parents=True, exist_ok=True)
        saved = self.failures / f"e2e-{spec.side}-{spec.new_tokens}-stderr.txt"
        saved.write_text(f"$ {shown}\n# {what}\n{tail}\n")
        last = _last_line(tail)
        raise E2EError(f"{spec.side}: `{shown}` {what}" + (f" ({last})" if last else "")
                       + f"; its stderr tail is in {saved}")


def _kill(proc: subprocess.Popen) -> None:
    """End the command we started (and anything it started in its session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
    proc.wait()


def run_numbers(rec: Dict[str, Any], wall: float, spec: RunSpec, command: str, caches_empty: bool) -> Dict[str, Any]:
    """One run's record: the shim's timestamps turned into the metrics (seconds since spawn)."""
    def get(k):
        v = rec.get(k)
        return float(v) if isinstance(v, (int, float)) else float("nan")

    out = {
        "side": spec.side, "new_tokens": spec.new_tokens, "round": spec.round, "cold": spec.cold,
        "command": command, "caches": dict(spec.caches), "caches_empty_at_spawn": caches_empty,
        "cache_files_after": {k: _count_files(Path(v)) for k, v in spec.caches.items()},
        "cache_modules_after": _modules(Path(spec.caches[CACHE_VARS["mlx"]])) if spec.cold else None,
        "wall_s": wall,
        "startup_s": get("main_s"),
        "before_load_s": get("load_start_s"),
        "load_s": get("load_end_s") - get("load_start_s"),
        "ttft_s": get("first_token_s"),
        "ttft_after_load_s": get("first_token_s") - get("load_end_s"),
        "decode_tps": get("decode_tps"),
        "gap_median_s": get("gap_median_s"),
        "gap_max_s": get("gap_max_s"),
        "gap_ratio": get("gap_ratio"),
        "tokens_generated": int(rec.get("tokens_generated") or 0),
        "peak_memory_gb": get("peak_memory_gb"),
        "prompt_tokens": rec.get("prompt_tokens"),
        "finish_reason": rec.get("finish_reason"),
        "model_class": rec.get("model_class"),
        "top_gaps": rec.get("top_gaps") or [],
        "exit_after_last_token_s": wall - get("last_token_s"),
        "shim": {k: rec.get(k) for k in ("shim_start_s", "main_s", "load_start_s", "load_end_s", "stream_start_s",
                                         "first_token_s", "last_token_s", "end_s")},
        "tokens": rec.get("tokens") or [],
        "kernel_verdicts": rec.get("kernel_verdicts"),
    }
    return out


# --- the schedule and the whole run ---------------------------------------------------------------

def schedule(s: E2ESettings, caches: Dict[str, Dict[str, str]]) -> List[RunSpec]:
    """Round 0: each side's first run on a fresh machine (empty caches), at the first new-token
    count. Then ``runs`` rounds per count; every round runs both sides, and who goes first swaps."""
    specs = [RunSpec(side, s.new_tokens[0], 0, True, caches[side]) for side in SIDES]
    r = 0
    for n in s.new_tokens:
        for _ in range(s.runs):
            r += 1
            order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
            specs += [RunSpec(side, n, r, False, caches[side]) for side in order]
    return specs


def make_cache_dirs(root: Path) -> Dict[str, Dict[str, str]]:
    """Empty kernel-cache folders per side: MLX's (every side) and ours (set on both, read by ours)."""
    out = {}
    for side in SIDES:
        out[side] = {}
        for kind, var in CACHE_VARS.items():
            p = root / side / ("mlx-ptx" if kind == "mlx" else "gemma4_mlx")
            p.mkdir(parents=True, exist_ok=False)
            out[side][var] = str(p)
    return out


def median(xs: Sequence[float]) -> float:
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(vals)) if vals else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def _first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def token_summary(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Do a side's fresh processes agree with each other (greedy: they should), and with the other side?"""
    out: Dict[str, Any] = {"consistent": {}, "ours_vs_stock": None, "prompt_tokens": {}}
    longest = {}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        out["prompt_tokens"][side] = sorted({r["prompt_tokens"] for r in mine if r.get("prompt_tokens")})
        ref = max(mine, key=lambda r: len(r["tokens"]))["tokens"] if mine else []
        longest[side] = ref
        bad = [(r["round"], r["new_tokens"], _first_divergence(r["tokens"], ref)) for r in mine
               if _first_divergence(r["tokens"], ref) is not None]
        out["consistent"][side] = {"same": not bad, "differing_runs": [
            {"round": rd, "new_tokens": n, "first_divergence": d} for rd, n, d in bad]}
    a, b = longest.get("ours", []), longest.get("stock", [])
    d = _first_divergence(a, b)
    out["ours_vs_stock"] = {"compared": min(len(a), len(b)), "match": d is None and bool(a) and bool(b),
                            "first_divergence": None if d is None else {"position": d, "ours": a[d], "stock": b[d]}}
    return out


def summarize(s: E2ESettings, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    keys = [k for k, _, _ in ALL_METRICS]
    warm = [r for r in runs if not r["cold"]]
    medians: Dict[str, Dict[str, Dict[str, float]]] = {side: {} for side in SIDES}
    ratios: Dict[str, Dict[str, float]] = {}
    for n in map(str, s.new_tokens):
        for side in SIDES:
            mine = [r for r in warm if r["side"] == side and str(r["new_tokens"]) == n]
            medians[side][n] = {k: median([r[k] for r in mine]) for k in keys}
            medians[side][n]["runs"] = len(mine)
        ratios[n] = {k: _ratio(medians["ours"][n][k], medians["stock"][n][k]) for k in keys}
    first = {side: next(r for r in runs if r["side"] == side and r["cold"]) for side in SIDES}
    first_ratios = {k: _ratio(first["ours"][k], first["stock"][k]) for k in keys}
    second: Dict[str, Any] = {}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        if len(mine) >= 2:
            t1, t2 = mine[0]["ttft_s"], mine[1]["ttft_s"]
            ratio = _ratio(t2, t1)
            second[side] = {"first_ttft_s": t1, "second_ttft_s": t2, "ratio": ratio,
                            "no_slower": bool(ratio <= SAME_START_TOLERANCE) if not math.isnan(ratio) else None,
                            "tolerance": SAME_START_TOLERANCE}
    return {"medians": medians, "ratios": ratios, "first_run": first, "first_run_ratios": first_ratios,
            "second_process": second, "tokens": token_summary(runs)}


def run_e2e(settings: Optional[E2ESettings] = None, log: Callable[[str], None] = print,
            runner: Optional[Callable[[RunSpec], Dict[str, Any]]] = None,
            out_dir: Optional[Path] = None) -> Dict[str, Any]:
    """The whole end-to-end comparison; returns the results (see :mod:`.e2e_report`).

    ``runner`` runs one :class:`RunSpec` (tests pass a fake). ``out_dir`` (default: the work
    folder) receives a failing command's stderr tail, and each run's record as it ends
    (``<stem>.runs.jsonl``), so a run cut off part way still leaves what it measured.
    """
    from .environment import environment

    s = (settings or E2ESettings()).resolve()
    t_start = time.perf_counter()
    work = Path(s.work).expanduser()
    env = environment()
    log(f"device {env['device']}{' (' + env['gpu_name'] + ')' if env['gpu_name'] else ''}, "
        f"mlx {env['mlx']}, mlx-lm {env['mlx_lm']}")
    if runner is None:
        ckpt = prepare_checkpoint(s, log)
        log(f"reading the checkpoint once ({warm_page_cache(Path(ckpt['path'])) / 1e9:.2f} GB) ...")
        prompt, n_prompt = build_prompt(load_encoder(ckpt["path"]), s.prompt_tokens, s.seed)
    else:
        ckpt = {"path": "(given runner)", "source": "given"}
        prompt, n_prompt = "(given runner)", s.prompt_tokens
    log(f"prompt: {n_prompt} tokens ({len(prompt)} characters), new tokens {', '.join(map(str, s.new_tokens))}, "
        f"{s.runs} warm run(s) per side and count after one first run each on a fresh machine")
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    runs: List[Dict[str, Any]] = []
    try:
        caches = make_cache_dirs(scratch / "kernel-caches")
        if runner is None:
            logs = scratch / "logs"
            logs.mkdir()
            runner = CommandRunner(ckpt["path"], prompt, n_prompt, s.timeout, logs, Path(out_dir or work))
        specs = schedule(s, caches)
        progress = None
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            progress = Path(out_dir) / f"{output_stem({'settings': asdict(s), 'checkpoint': ckpt})}.runs.jsonl"
            progress.write_text("")
        for i, spec in enumerate(specs, 1):
            r = runner(spec)
            runs.append(r)
            if progress is not None:
                with open(progress, "a", encoding="utf-8") as f:
                    f.write(json.dumps(_jsonable(r)) + "\n")
            what = "first run on a fresh machine" if spec.cold else f"round {spec.round}"
            log(f"  [{i}/{len(specs)}] {spec.side:>5} {spec.new_tokens:>5} new tokens ({what}): wall {r['wall_s']:.2f} s, "
                f"load {r['load_s']:.2f} s, TTFT {r['ttft_s']:.2f} s, decode {r['decode_tps']:.1f} tok/s, "
                f"worst gap {r['gap_ratio']:.1f}x the median, {r['tokens_generated']} tokens")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = summarize(s, runs)
    pt = summary["tokens"]["prompt_tokens"]
    if pt.get("ours") != pt.get("stock"):
        log(f"warning: the two commands saw different prompt lengths: ours {pt.get('ours')}, stock {pt.get('stock')}")
    results: Dict[str, Any] = {
        "schema": "gemma4-mlx-e2e/1",
        "settings": asdict(s),
        "environment": env,
        "checkpoint": ckpt,
        "prompt": {"text": prompt, "tokens": n_prompt, "characters": len(prompt)},
        "commands": {side: display_command(side, command_args(side, ckpt["path"], prompt, s.new_tokens[0])[0],
                                           n_prompt) for side in SIDES},
        "metrics": [{"key": k, "label": lab, "better": b} for k, lab, b in ALL_METRICS],
        "runs": runs,
        **summary,
        "elapsed_s": time.perf_counter() - t_start,
    }
    return results


def output_stem(results: Dict[str, Any]) -> str:
    c, s = results["checkpoint"], results["settings"]
    name = c.get("preset") or Path(str(c.get("model") or c.get("path"))).name
    q = f"-q{s['quantize']}" if s.get("quantize") else ""
    return f"e2e-{name}-{c.get('dtype') or s['dtype']}{q}"
