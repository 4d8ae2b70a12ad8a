"""Shim around one side's generate command, for ``gemma4-mlx compare --e2e`` (:mod:`.e2e`).

Run by file path, not with ``-m``, so stock's process never imports this package::

    python .../gemma4_mlx/bench/e2e_child.py stock --model DIR --prompt TEXT ...   # mlx_lm.generate
    python .../gemma4_mlx/bench/e2e_child.py ours --model DIR --prompt TEXT ...    # gemma4-mlx generate

It changes neither command: it wraps the side's load function and its ``stream_generate``
generator where the command looks them up (stock: the globals of module ``mlx_lm.generate``,
whose ``main`` is what the ``mlx_lm.generate`` console script runs; ours: ``gemma4_mlx.loading.load``
and ``gemma4_mlx.generation.stream_generate``, patched as soon as those modules are first imported,
whenever the command imports them), timestamps each token as the generator yields it, then runs the command's own ``main``.
At exit it writes one JSON record to the file named by ``GEMMA4_MLX_E2E_RECORD``. Times are
seconds since the parent spawned the process (``GEMMA4_MLX_E2E_SPAWN``, the parent's
``time.time()``), so they include the interpreter's start.
"""

import os
import sys
import time

_WALL0 = time.time()
_PERF0 = time.perf_counter()

# Run as a script, sys.path[0] is this folder: its modules (settings.py, run.py ...) must not
# shadow anything the command imports.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

RECORD_ENV = "GEMMA4_MLX_E2E_RECORD"
SPAWN_ENV = "GEMMA4_MLX_E2E_SPAWN"
SIDES = ("stock", "ours")
TOP_GAPS = 5


class Recorder:
    """Timestamps of one command: when it starts, loads, and yields each token."""

    def __init__(self, side: str):
        try:
            spawn = float(os.environ[SPAWN_ENV])
        except (KeyError, ValueError):
            spawn = _WALL0
        self.offset = _WALL0 - spawn  # seconds from the spawn to _PERF0
        self.side = side
        self.record = {"side": side, "shim_start_s": self.offset, "load_calls": 0, "stream_calls": 0}
        self.stamps = []
        self.tokens = []
        self.last = None

    def now(self) -> float:
        return self.offset + (time.perf_counter() - _PERF0)

    def mark(self, key: str) -> None:
        self.record[key] = self.now()

    def wrap_load(self, load):
        @functools.wraps(load)
        def timed_load(*args, **kwargs):
            self.record["load_calls"] += 1
            if self.record["load_calls"] == 1:
                self.mark("load_start_s")
            out = load(*args, **kwargs)
            if self.record["load_calls"] == 1:
                self.mark("load_end_s")
                model = out[0] if isinstance(out, tuple) else out
                self.record["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
            return out

        return timed_load

    def wrap_stream(self, stream_generate):
        @functools.wraps(stream_generate)
        def timed_stream(*args, **kwargs):
            self.record["stream_calls"] += 1
            self.mark("stream_start_s")
            for response in stream_generate(*args, **kwargs):
                self.stamps.append(self.now())
                self.tokens.append(int(getattr(response, "token", -1)))
                self.last = response
                yield response

        return timed_stream

    def summary(self) -> dict:
        rec = dict(self.record)
        n = len(self.stamps)
        rec["tokens_generated"] = n
        rec["gemma4_mlx_imported"] = "gemma4_mlx" in sys.modules  # never, on stock's side
        rec["tokens"] = self.tokens
        rec["kernel_verdicts"] = _kernel_verdicts()
        if self.last is not None:
            rec["prompt_tokens"] = int(getattr(self.last, "prompt_tokens", 0) or 0)
            rec["finish_reason"] = getattr(self.last, "finish_reason", None)
            peak = getattr(self.last, "peak_memory", None)
            rec["peak_memory_gb"] = float(peak) if peak is not None else None
        if n:
            rec["first_token_s"] = self.stamps[0]
            rec["last_token_s"] = self.stamps[-1]
        if n >= 2:
            gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
            span = self.stamps[-1] - self.stamps[0]
            rec["decode_tps"] = (n - 1) / span if span > 0 else None
            med = statistics.median(gaps)
            worst = max(gaps)
            rec["gap_median_s"] = med
            rec["gap_max_s"] = worst
            rec["gap_ratio"] = worst / med if med > 0 else None
            # gap i lies between token i and token i + 1 (token 0 is the first one)
            order = sorted(range(len(gaps)), key=gaps.__getitem__, reverse=True)[:TOP_GAPS]
            rec["top_gaps"] = [{"after_token": i, "s": gaps[i]} for i in order]
        return rec

    def write(self, exit_code, error=None) -> None:
        rec = self.summary()
        rec["end_s"] = self.now()
        rec["exit_code"] = exit_code
        rec["error"] = error
        path = os.environ.get(RECORD_ENV)
        if not path:
            return
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f)
        os.replace(tmp, path)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def run_stock(rec: Recorder, argv) -> None:
    import importlib

    # ``import mlx_lm.generate`` would give the function mlx_lm re-exports under that name.
    module = importlib.import_module("mlx_lm.generate")
    module.load = rec.wrap_load(module.load)
    module.stream_generate = rec.wrap_stream(module.stream_generate)
    sys.argv = ["mlx_lm.generate", *argv]
    rec.mark("main_s")
    module.main()


class PatchOnImport:
    """A ``sys.meta_path`` finder that patches a module right after it first executes, so a
    command that imports it lazily still does so when it would (its import time stays where it
    was) and still gets the patched attribute."""

    def __init__(self, patches):
        self.pending = dict(patches)  # module name -> function(module)

    def find_spec(self, name, path=None, target=None):
        patch = self.pending.pop(name, None)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                execute = spec.loader.exec_module

                def exec_module(module, execute=execute):
                    execute(module)
                    patch(module)

                spec.loader.exec_module = exec_module
                return spec
        return None

    def install(self) -> None:
        for name in list(self.pending):
            if name in sys.modules:  # already imported: patch it now
                self.pending.pop(name)(sys.modules[name])
        sys.meta_path.insert(0, self)


def _kernel_verdicts() -> dict | None:
    """Our kernels' self-check verdicts in this process (None on stock's side): how many passed,
    and each failure's kernel, shape class and reason. A kernel that failed ran as MLX ops, which
    changes what the run's timings measure."""
    if "gemma4_mlx" not in sys.modules:
        return None
    from gemma4_mlx.kernels import dispatch
    verdicts = dispatch.verdicts()
    failed = [f"{key[0]} {key[1:]}: {reason}" for key, (ok, reason) in verdicts.items() if not ok]
    return {"passed": len(verdicts) - len(failed), "failed": failed}


def run_ours(rec: Recorder, argv) -> None:
    def patch_loading(module):
        module.load = rec.wrap_load(module.load)

    def patch_generation(module):
        module.stream_generate = rec.wrap_stream(module.stream_generate)

    PatchOnImport({"gemma4_mlx.loading": patch_loading, "gemma4_mlx.generation": patch_generation}).install()
    import gemma4_mlx.cli as cli

    sys.argv = ["gemma4-mlx", "generate", *argv]
    rec.mark("main_s")
    cli.main(["generate", *argv])


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SIDES:
        print(f"usage: {os.path.basename(__file__)} stock|ours ARGS... (the side's generate arguments)",
              file=sys.stderr)
        sys.exit(2)
    side, argv = sys.argv[1], sys.argv[2:]
    rec = Recorder(side)
    code, error = 0, None
    try:
        (run_stock if side == "stock" else run_ours)(rec, argv)
    except SystemExit as e:
        code = _exit_code(e)
        if code:
            error = f"exit status {code}"
        raise
    except BaseException as e:
        code, error = 1, f"{type(e).__name__}: {e}"
        raise
    finally:
        sys.stdout.flush()
        rec.write(code, error)


if __name__ == "__main__":
    main()
