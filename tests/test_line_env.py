"""bench/line_env.py: a switch one ablation line sets never reaches another line, and the outer
environment stays every line's base (session 32's step_ints pairing timed the same step twice
because one line's GEMMA4_MLX_INTS_AHEAD=0 stayed set for the next)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.line_env import LineEnv  # noqa: E402

A, B, OUTER, FIXED = "G4TEST_LINE_A", "G4TEST_LINE_B", "G4TEST_LINE_OUTER", "G4TEST_LINE_FIXED"


def test_each_line_gets_its_own_switches_over_the_outer_environment(monkeypatch):
    for name in (A, B, FIXED):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(OUTER, "outer")
    lines = [None, {}, {A: "0"}, {B: "1", OUTER: "line"}, {A: "1", B: "2"}]
    env = LineEnv(lines, always=[FIXED])
    os.environ[FIXED] = "set after the outer values were read"

    env.use(lines[2])
    assert (os.environ.get(A), os.environ.get(B), os.environ[OUTER], os.environ.get(FIXED)) == ("0", None, "outer", None)
    env.use(lines[1])  # the line that sets nothing: no switch of the last line left
    assert (os.environ.get(A), os.environ.get(B), os.environ[OUTER]) == (None, None, "outer")
    env.use(lines[3])
    assert (os.environ.get(A), os.environ.get(B), os.environ[OUTER]) == (None, "1", "line")
    env.use(lines[0])  # stock's: the outer value back
    assert (os.environ.get(A), os.environ.get(B), os.environ[OUTER]) == (None, None, "outer")
    env.use(lines[4])
    assert (os.environ.get(A), os.environ.get(B)) == ("1", "2")


def test_the_step_ablation_resets_through_it():
    source = (Path(__file__).resolve().parents[1] / "bench" / "ablate.py").read_text()
    assert "use = LineEnv([env for _, env in CONFIGS], always=SWITCHES).use" in source
    assert "os.environ.pop" not in source  # no second, partial reset beside it
