"""``gemma4-mlx compare --e2e``: both generate commands in fresh processes (gemma4_mlx/bench/e2e.py).

Structure and bookkeeping only: no timing is asserted. Commands really run (tiny preset, a few
tokens); the schedule and the cold-start bookkeeping are also checked with a fake runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma4_mlx.bench import e2e, e2e_child, e2e_report
from gemma4_mlx.bench.e2e import (CommandRunner, E2EError, E2ESettings, RunSpec, build_prompt, checkpoint_complete,
                                  load_encoder, prepare_checkpoint, run_e2e)
from cli_harness import invoke as _cli

PROMPT_TOKENS = 24
NEW_TOKENS = 4
STOCK_CLASS = "mlx_lm.models.gemma4_text.Model"
OURS_CLASS = "gemma4_mlx.model.Model"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-work")


@pytest.fixture(scope="module")
def tiny_checkpoint(work) -> Path:
    info = prepare_checkpoint(E2ESettings(preset="tiny", work=str(work)).resolve(), log=lambda m: None)
    return Path(info["path"])


# --- the command, end to end -------------------------------------------------------------------

def test_compare_e2e_end_to_end(work, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    r = _cli(["compare", "--e2e", "--preset", "tiny", "--new-tokens", NEW_TOKENS, "--prompt-tokens", PROMPT_TOKENS,
              "--runs", 1, "--work", work, "--out", out])
    assert r.exit_code == 0, r.output
    assert "first run on a fresh machine" in r.output and "ours/stock" in r.output
    stem = "e2e-tiny-bfloat16"
    res = json.loads((out / f"{stem}.json").read_text())
    for key in ("schema", "settings", "environment", "checkpoint", "prompt", "commands", "runs", "medians", "ratios",
                "first_run", "first_run_ratios", "second_process", "tokens", "elapsed_s"):
        assert key in res, key
    assert res["checkpoint"]["path"] == str(tiny_checkpoint) and res["checkpoint"]["reused"] is True
    assert 0 < res["prompt"]["tokens"] <= PROMPT_TOKENS
    assert res["commands"]["stock"].startswith("mlx_lm.generate --model ")
    assert "--ignore-chat-template" in res["commands"]["stock"] and "--temp 0" in res["commands"]["stock"]
    assert res["commands"]["ours"].startswith("gemma4-mlx generate --model ")
    assert "--no-chat-template" in res["commands"]["ours"]

    runs = res["runs"]
    assert len(runs) == 4  # one first run per side, then one warm run per side
    for r_ in runs:
        assert r_["model_class"] == (STOCK_CLASS if r_["side"] == "stock" else OURS_CLASS)
        assert 0 < r_["tokens_generated"] <= NEW_TOKENS and len(r_["tokens"]) == r_["tokens_generated"]
        assert r_["prompt_tokens"] == res["prompt"]["tokens"]  # the same prompt, as both commands encode it
        assert 0 < r_["startup_s"] <= r_["before_load_s"] < r_["ttft_s"] < r_["wall_s"]
        assert r_["load_s"] > 0 and r_["ttft_after_load_s"] > 0
    # Both sides ran, as separate processes, each its own implementation.
    assert {r_["side"] for r_ in runs} == {"stock", "ours"}
    for side in ("stock", "ours"):
        assert res["medians"][side][str(NEW_TOKENS)]["runs"] == 1
        assert res["medians"][side][str(NEW_TOKENS)]["tokens_generated"] > 0
    assert set(res["ratios"][str(NEW_TOKENS)]) >= {"wall_s", "load_s", "ttft_s", "decode_tps", "gap_ratio"}
    assert res["second_process"]["ours"]["no_slower"] in (True, False)
    assert res["tokens"]["consistent"]["ours"]["same"] and res["tokens"]["consistent"]["stock"]["same"]

    # Cold start on real processes: empty caches of their own for each side's first run, kept after.
    cold = {r_["side"]: r_ for r_ in runs if r_["cold"]}
    assert set(cold) == {"stock", "ours"} and all(r_["caches_empty_at_spawn"] for r_ in cold.values())
    assert set(cold["stock"]["caches"].values()).isdisjoint(cold["ours"]["caches"].values())
    for r_ in runs:
        assert r_["caches"] == cold[r_["side"]]["caches"]
    assert res["first_run"]["ours"]["cold"] and res["first_run"]["stock"]["cold"]
    assert not list(work.glob("run-*")), "the run's scratch folder (caches, logs) is removed"

    progress = [json.loads(ln) for ln in (out / f"{stem}.runs.jsonl").read_text().splitlines()]
    assert [(x["side"], x["round"]) for x in progress] == [(x["side"], x["round"]) for x in runs]
    md = (out / f"{stem}.md").read_text()
    assert "| tiny bfloat16" in md and "wall s" in md and "decode tok/s" in md and "worst / median gap" in md
    assert f"{NEW_TOKENS} new tokens: ours/stock" in md and "first run on a fresh machine" in md
    pytest.importorskip("matplotlib")
    assert (out / f"{stem}.png").stat().st_size > 0


# --- the shim, each side alone ------------------------------------------------------------------

def test_shim_times_each_side_alone(tiny_checkpoint, tmp_path):
    encode = load_encoder(str(tiny_checkpoint))
    prompt, n = build_prompt(encode, PROMPT_TOKENS)
    procs = {}
    for side in ("stock", "ours"):
        args, _ = e2e.command_args(side, str(tiny_checkpoint), prompt, NEW_TOKENS)
        env = dict(os.environ, **{e2e_child.RECORD_ENV: str(tmp_path / f"{side}.json"),
                                  e2e_child.SPAWN_ENV: repr(time.time())})
        env["PYTHONPATH"] = os.pathsep.join([str(Path(e2e.__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        procs[side] = subprocess.Popen([sys.executable, e2e_child.__file__, side, *args], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for side, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        rec = json.loads((tmp_path / f"{side}.json").read_text())
        assert rec["side"] == side and rec["exit_code"] == 0 and rec["error"] is None
        assert rec["load_calls"] == 1 and rec["stream_calls"] == 1
        assert rec["model_class"] == (STOCK_CLASS if side == "stock" else OURS_CLASS)
        assert rec["gemma4_mlx_imported"] is (side == "ours")  # stock's process never imports our package
        if side == "stock":
            assert rec["kernel_verdicts"] is None
        else:  # the CPU runs no custom kernel: nothing checked, nothing failed
            assert rec["kernel_verdicts"] == {"passed": 0, "failed": []}
        assert rec["prompt_tokens"] == n
        assert rec["tokens_generated"] == len(rec["tokens"]) and 0 < rec["tokens_generated"] <= NEW_TOKENS
        assert 0 <= rec["shim_start_s"] < rec["main_s"] < rec["load_start_s"] < rec["load_end_s"]
        assert rec["load_end_s"] <= rec["stream_start_s"] < rec["first_token_s"] <= rec["last_token_s"] <= rec["end_s"]
        if rec["tokens_generated"] >= 2:
            assert rec["decode_tps"] > 0 and rec["gap_max_s"] >= rec["gap_median_s"] > 0 and rec["gap_ratio"] >= 1
            assert rec["top_gaps"][0]["s"] == rec["gap_max_s"]
        assert out.strip(), "the command's own output is left alone"


def test_shim_usage_error():
    r = subprocess.run([sys.executable, e2e_child.__file__, "neither"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "stock|ours" in r.stderr


# --- cold start, alternation and medians with a fake runner -----------------------------------------

def test_cold_start_bookkeeping_and_alternation(tmp_path):
    seen = []

    def fake(spec: RunSpec):
        empty = {k: not any(Path(v).iterdir()) for k, v in spec.caches.items()}
        seen.append((spec, empty))
        for v in spec.caches.values():  # what a side's kernel builds would leave behind
            Path(v, f"kernel-{len(seen)}").write_text("x")
        base = 10.0 if spec.cold else 1.0 + (0.5 if spec.side == "ours" else 0.0) + spec.new_tokens / 1000
        return {"side": spec.side, "new_tokens": spec.new_tokens, "round": spec.round, "cold": spec.cold,
                "caches": dict(spec.caches), "caches_empty_at_spawn": all(empty.values()), "wall_s": base + 2,
                "startup_s": 0.1, "before_load_s": 0.15, "load_s": 0.2, "ttft_s": base, "ttft_after_load_s": base - 0.3, "decode_tps": 50.0,
                "gap_median_s": 0.02, "gap_max_s": 0.04, "gap_ratio": 2.0, "tokens_generated": spec.new_tokens,
                "peak_memory_gb": 0.1, "prompt_tokens": 20, "tokens": list(range(spec.new_tokens)),
                "kernel_verdicts": ({"passed": 3, "failed": ["qmv ('cuda', 4): mismatch"]}
                                    if spec.side == "ours" and spec.round == 1 else None)}

    s = E2ESettings(preset="tiny", new_tokens=[4, 8], runs=2, work=str(tmp_path / "work"))
    res = run_e2e(s, log=lambda m: None, runner=fake)
    specs = [sp for sp, _ in seen]
    # Round 0: each side's first run, at the first count, with empty caches of its own.
    assert [(sp.side, sp.cold, sp.new_tokens) for sp in specs[:2]] == [("stock", True, 4), ("ours", True, 4)]
    assert all(all(empty.values()) for _, empty in seen[:2])
    assert not any(sp.cold for sp in specs[2:]) and len(specs) == 2 + 2 * 2 * 2
    stock_dirs, ours_dirs = specs[0].caches, specs[1].caches
    assert set(stock_dirs) == set(ours_dirs) == {"MLX_PTX_CACHE_DIR", "GEMMA4_MLX_CACHE"}
    assert set(stock_dirs.values()).isdisjoint(ours_dirs.values())
    for sp, empty in seen[2:]:  # later runs keep the side's folders, now filled by its first run
        assert sp.caches == (stock_dirs if sp.side == "stock" else ours_dirs) and not any(empty.values())
    # Alternation: every round runs both sides, and who goes first swaps round by round.
    firsts = [specs[i].side for i in range(2, len(specs), 2)]
    assert firsts == ["ours", "stock", "ours", "stock"]
    assert all({specs[i].side, specs[i + 1].side} == {"stock", "ours"} for i in range(0, len(specs), 2))
    # The first runs are reported apart; the medians come from the warm runs only.
    assert res["first_run"]["ours"]["ttft_s"] == 10.0 and res["first_run"]["stock"]["ttft_s"] == 10.0
    assert res["medians"]["stock"]["4"]["ttft_s"] == pytest.approx(1.004)
    assert res["medians"]["ours"]["8"]["ttft_s"] == pytest.approx(1.508)
    assert res["medians"]["ours"]["4"]["runs"] == 2
    assert res["ratios"]["4"]["ttft_s"] == pytest.approx(1.504 / 1.004)
    sp = res["second_process"]["ours"]
    assert sp["first_ttft_s"] == 10.0 and sp["second_ttft_s"] == pytest.approx(1.504) and sp["no_slower"] is True
    assert not list((tmp_path / "work").glob("run-*"))
    table = e2e_report.format_table(res)
    assert "first run on a fresh machine (4): ours" in table and "8 new tokens: ours/stock" in table
    # A kernel that fell back to MLX ops is named under the table, once per run it happened in.
    fell_back = [ln for ln in table.splitlines() if "self-check failed" in ln]
    ours_round_1 = [sp for sp in specs if sp.side == "ours" and sp.round == 1]
    assert ours_round_1 and len(fell_back) == len(ours_round_1)
    assert all("round 1" in ln and "qmv ('cuda', 4): mismatch" in ln for ln in fell_back)


def test_report_gives_each_warm_process_decode_rate_and_the_ratio_range():
    """The headline's median of a few processes hides their spread (session 27: stock's two bf16
    processes decoded at 72 and 116 tok/s): the notes list each warm process and the range."""
    def run(side, rnd, tps, cold=False):
        return {"side": side, "new_tokens": 128, "round": rnd, "cold": cold, "decode_tps": tps}

    runs = [run("stock", 0, 113.9, cold=True), run("ours", 0, 262.4, cold=True), run("ours", 1, 242.6),
            run("stock", 1, 71.9), run("stock", 2, 116.3), run("ours", 2, 239.9)]
    notes = e2e_report._decode_spread({"medians": {"ours": {"128": {}}}, "runs": runs})
    assert notes == ["decode tok/s of each warm process (128 new tokens): stock 71.9, 116.3; ours 242.6, 239.9; "
                     "ours/stock over the pairings 2.06x-3.37x"]
    # a side without a warm rate (a run cut off) gives no line rather than a wrong range
    assert e2e_report._decode_spread({"medians": {"ours": {"128": {}}}, "runs": runs[:3]}) == []


# --- failures -------------------------------------------------------------------------------------

def test_failing_side_is_reported_in_one_line(work, tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])  # a truncated weight file: the load fails
    out = tmp_path / "out"
    r = _cli(["compare", "--e2e", "--model", broken, "--new-tokens", NEW_TOKENS, "--prompt-tokens", PROMPT_TOKENS,
              "--runs", 1, "--work", work, "--out", out])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: stock: `mlx_lm.generate --model ") and "exited with status" in lines[0]
    assert "Traceback" not in r.output
    saved = out / f"e2e-stock-{NEW_TOKENS}-stderr.txt"
    assert saved.is_file() and saved.read_text().startswith("$ mlx_lm.generate")
    assert str(saved) in lines[0]


def test_timeout_names_the_side_and_command(tiny_checkpoint, tmp_path):
    caches = e2e.make_cache_dirs(tmp_path / "caches")
    logs = tmp_path / "logs"
    logs.mkdir()
    runner = CommandRunner(str(tiny_checkpoint), "Hello there", 3, timeout=0.2, logs=logs, failures=tmp_path / "f")
    t = time.perf_counter()
    with pytest.raises(E2EError) as e:
        runner(RunSpec("ours", NEW_TOKENS, 0, True, caches["ours"]))
    assert time.perf_counter() - t < 30
    msg = str(e.value)
    assert msg.startswith("ours: `gemma4-mlx generate --model ") and "timed out after 0.2 s" in msg
    assert (tmp_path / "f" / f"e2e-ours-{NEW_TOKENS}-stderr.txt").is_file()


# --- settings, the checkpoint and the prompt ----------------------------------------------------------

@pytest.mark.parametrize("kwargs, msg", [
    (dict(preset="tiny", model="x"), "either --model or --preset"),
    (dict(runs=0), "--runs"),
    (dict(new_tokens=[1]), "--new-tokens"),
    (dict(new_tokens=[4, 4]), "twice"),
    (dict(prompt_tokens=1), "--prompt-tokens"),
    (dict(quantize=3), "--quantize"),
    (dict(dtype="int8"), "dtype"),
    (dict(timeout=0), "--timeout"),
])
def test_settings_are_checked(kwargs, msg):
    with pytest.raises(E2EError, match=msg):
        E2ESettings(**kwargs).resolve()


def test_cpu_defaults():
    s = E2ESettings().resolve()
    assert s.preset == e2e.CPU_PRESET and s.dtype == "bfloat16" and s.runs == 2
    assert s.new_tokens == e2e.CPU_NEW_TOKENS and s.prompt_tokens == e2e.CPU_PROMPT_TOKENS
    assert Path(s.work) == e2e.default_work_dir() and s.timeout == e2e.DEFAULT_TIMEOUT_S


def test_options_that_do_not_apply():
    r = _cli(["compare", "--e2e", "-L", "64"])
    assert r.exit_code == 2 and "--prompt-lengths" in r.output
    r = _cli(["compare", "--new-tokens", "4"])
    assert r.exit_code == 2 and "--e2e" in r.output


def test_checkpoint_is_reused_only_when_complete(work, tiny_checkpoint):
    s = E2ESettings(preset="tiny", work=str(work)).resolve()
    logs = []
    info = prepare_checkpoint(s, log=logs.append)
    assert info["reused"] and info["path"] == str(tiny_checkpoint) and logs[0].startswith("reusing")
    spec = json.loads((work / f"{tiny_checkpoint.name}.e2e.json").read_text())["spec"]
    assert checkpoint_complete(tiny_checkpoint, spec)
    tok = tiny_checkpoint / "tokenizer.json"
    tok.write_text(tok.read_text()[:-10])  # truncated: no longer what was written
    assert not checkpoint_complete(tiny_checkpoint, spec)
    info = prepare_checkpoint(s, log=logs.append)
    assert not info["reused"] and checkpoint_complete(tiny_checkpoint, spec)
    assert not checkpoint_complete(tiny_checkpoint, {**spec, "seed": 1})  # another seed is another checkpoint


def test_quantized_copy(work, tiny_checkpoint):
    info = prepare_checkpoint(E2ESettings(preset="tiny", quantize=4, work=str(work)).resolve(), log=lambda m: None)
    path = Path(info["path"])
    assert path.name == f"{tiny_checkpoint.name}-q4" and path.parent == tiny_checkpoint.parent
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert (path / "tokenizer.json").is_file()
    assert prepare_checkpoint(E2ESettings(preset="tiny", quantize=4, work=str(work)).resolve(),
                              log=lambda m: None)["reused"]


def test_a_checkpoint_is_used_as_is(tiny_checkpoint, work):
    info = prepare_checkpoint(E2ESettings(model=str(tiny_checkpoint), work=str(work)).resolve(), log=lambda m: None)
    assert info["path"] == str(tiny_checkpoint) and info["source"] == "checkpoint" and info["dtype"] == "bfloat16"
    stem = e2e.output_stem({"checkpoint": info, "settings": {"dtype": "auto", "quantize": None}})
    assert stem == f"e2e-{tiny_checkpoint.name}-bfloat16"


def test_unknown_preset(work):
    with pytest.raises(E2EError, match="unknown preset"):
        prepare_checkpoint(E2ESettings(preset="nope", work=str(work)).resolve(), log=lambda m: None)


def test_prompt_is_counted_with_the_tokenizer(tiny_checkpoint):
    encode = load_encoder(str(tiny_checkpoint))
    for n in (16, 100):
        text, count = build_prompt(encode, n, seed=1)
        assert count == len(encode(text)) and n - 8 <= count <= n
        assert build_prompt(encode, n, seed=1) == (text, count)  # deterministic
    assert build_prompt(encode, 100, seed=2)[0] != build_prompt(encode, 100, seed=1)[0]


def test_long_prompts_go_through_stdin():
    args, via_stdin = e2e.command_args("ours", "/m", "x" * (e2e.ARGV_PROMPT_LIMIT + 1), 8)
    assert via_stdin and args[args.index("--prompt") + 1] == "-"
    args, via_stdin = e2e.command_args("stock", "/m", "hello", 8)
    assert not via_stdin and args[args.index("--prompt") + 1] == "hello"
    assert e2e.display_command("stock", args, 3) == ("mlx_lm.generate --model /m --prompt '<3-token prompt>' "
                                                     "--max-tokens 8 --temp 0 --ignore-chat-template")
