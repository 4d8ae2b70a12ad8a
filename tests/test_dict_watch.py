"""The decode step's tree snapshot, told of changes by CPython's dict watchers (gemma4_mlx/dict_watch.py).

The snapshot is asked at every decode step; where dicts can be watched (CPython 3.12+) it looks
only at the tree's lists while no watched dict changed. These tests check the watcher itself in
this interpreter and under a 3.12+ one (CI's venv is 3.11: the pyenv interpreters on the image run
it), and the snapshot's rule with a stand-in watcher (test_model_changes.py covers every way of
changing a model, with whichever path this interpreter has)."""

from __future__ import annotations

import glob
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from gemma4_mlx import decode, dict_watch

WATCH_FILE = Path(dict_watch.__file__)

# what a 3.12+ interpreter runs with the module loaded by path (it imports nothing of the package)
SCRIPT = r"""
import gc, importlib.util, sys
spec = importlib.util.spec_from_file_location("dict_watch", sys.argv[1])
dw = importlib.util.module_from_spec(spec); spec.loader.exec_module(dw)
class Module(dict):  # as mlx.nn.Module: a dict subclass
    pass
m, other = Module(a=1), {"x": 1}
assert dw.watch(m) and dw.unavailable_reason() is None
e = dw.events(); other["y"] = 2
assert dw.events() == e, "an unwatched dict counted"
e = dw.events(); m["b"] = 2; m["a"] = 3; del m["b"]; m.update(c=4); m.setdefault("d", 5); m.pop("d"); m.clear()
assert dw.events() - e == 7, dw.events() - e
e = dw.events(); del m; gc.collect()
assert dw.events() - e == 1, "its deallocation"
class Layer:
    def __init__(self):
        self.scale = 1.0
layer = Layer()
if dw.counts_attribute_writes():  # then a write to a watched vars() dict must be counted
    assert dw.watch(vars(layer))
    e = dw.events(); layer.scale = 2.0; layer.extra = 1
    assert dw.events() - e == 2
left = Module(z=1); dw.watch(left)  # still watched at exit: the watcher is cleared before teardown
print("watched", dw.counts_attribute_writes())
"""


def _interpreters_312() -> list:
    """CPython 3.12+ interpreters that run here (pyenv's shims name versions they may refuse)."""
    candidates = [sys.executable] + [shutil.which(n) for n in ("python3.12", "python3.13")]
    pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv}/versions/3.1[2-9]*/bin/python3"))
    found = []
    for python in dict.fromkeys(c for c in candidates if c):
        try:
            r = subprocess.run([python, "-c", "import sys; print(sys.implementation.name, sys.version_info >= (3, 12))"],
                               capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if r.returncode == 0 and r.stdout.split() == ["cpython", "True"]:
            found.append(python)
    return found


def test_the_watcher_in_this_interpreter():
    class Module(dict):
        pass

    m = Module(a=1)
    if sys.version_info >= (3, 12) and sys.implementation.name == "cpython":
        assert dict_watch.watch(m) and dict_watch.unavailable_reason() is None
        e = dict_watch.events()
        m["a"] = 2
        assert dict_watch.events() == e + 1
    else:  # nothing counted, and the snapshot compares as before
        assert not dict_watch.watch(m)
        assert "3.12" in dict_watch.unavailable_reason()
        e = dict_watch.events()
        m["a"] = 2
        assert dict_watch.events() == e


@pytest.mark.parametrize("python", _interpreters_312() or [None])
def test_the_watcher_under_python_312_or_later(python):
    if python is None:
        pytest.skip("no CPython 3.12+ interpreter on this machine")
    r = subprocess.run([python, "-c", SCRIPT, str(WATCH_FILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split()[0] == "watched", r.stdout + r.stderr


def test_the_switch_turns_it_off():
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('w', sys.argv[1]); "
            "w = importlib.util.module_from_spec(s); s.loader.exec_module(w); print(w.watch({}), w.unavailable_reason())")
    for python in _interpreters_312()[:1] or [sys.executable]:
        r = subprocess.run([python, "-c", code, str(WATCH_FILE)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, dict_watch.ENV: "0"})
        assert r.stdout.strip() == f"False {dict_watch.ENV}=0", r.stdout + r.stderr


class _Scaled(nn.Module):
    """A module from outside MLX and this package (its settings are compared)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = 2.0


class _Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(4, 4), _Scaled()]
        self.norm = nn.RMSNorm(4)


@pytest.fixture
def stand_in_watcher(monkeypatch):
    """Every dict 'watched'; changes counted only where the test says so; attribute writes not
    counted (as CPython 3.13): the snapshot looks at the attributes itself."""
    count = [0]
    monkeypatch.setattr(dict_watch, "watch", lambda d: True)
    monkeypatch.setattr(dict_watch, "events", lambda: count[0])
    monkeypatch.setattr(dict_watch, "counts_attribute_writes", lambda: False)
    return count


def test_snapshot_where_attribute_writes_are_counted(stand_in_watcher, monkeypatch):
    """As CPython 3.12: the attributes are watched too, so a setting is seen through the count."""
    monkeypatch.setattr(dict_watch, "counts_attribute_writes", lambda: True)
    tree = _Tree()
    snap = decode.TreeSnapshot(tree)
    assert snap._attributes_watched and not snap._looked_at
    tree.layers[1].scale = 3.0
    stand_in_watcher[0] += 1  # what CPython 3.12 reports for that write
    assert not snap.current()
    tree.layers[1].scale = 2.0 + 0.0  # an equal value again: current once more
    stand_in_watcher[0] += 1
    assert snap.current()


def test_snapshot_with_unchanged_dicts_looks_only_at_lists_and_settings(stand_in_watcher, monkeypatch):
    tree = _Tree()
    snap = decode.TreeSnapshot(tree)
    scans = []
    real = snap._identities_hold
    monkeypatch.setattr(snap, "_identities_hold", lambda: scans.append(1) or real())
    assert snap.current() and not scans  # the quick look alone
    # a list item replaced: lists are not watched, so the quick look itself sees it
    tree.layers[0] = nn.Linear(4, 4)
    assert not snap.current()


def test_snapshot_decides_by_the_exact_rule_once_a_dict_changed(stand_in_watcher):
    tree = _Tree()
    snap = decode.TreeSnapshot(tree)
    old = tree.norm.weight
    tree.norm.weight = mx.zeros((4,))
    stand_in_watcher[0] += 1  # what CPython reports for that write
    assert not snap.current()
    tree.norm.weight = old  # back as it was: current again, and the quick look starts from here
    stand_in_watcher[0] += 1
    assert snap.current() and snap._events == stand_in_watcher[0]


def test_snapshot_compares_settings_by_value(stand_in_watcher):
    tree = _Tree()
    snap = decode.TreeSnapshot(tree)
    tree.layers[1].scale = 2.0 + 0.0  # an equal value: still current
    assert snap.current()
    tree.layers[1].scale = 3.0
    assert not snap.current()
    tree.layers[1].scale = 2.0
    assert snap.current()
    tree.layers[1].extra = 1  # a new setting
    assert not snap.current()


def test_snapshot_without_watchers_scans_every_step(monkeypatch):
    monkeypatch.setattr(dict_watch, "watch", lambda d: False)
    tree = _Tree()
    snap = decode.TreeSnapshot(tree)
    assert snap.current()
    tree.norm.weight = mx.zeros((4,))  # no event is counted: the scan sees it
    assert not snap.current()


def test_snapshot_sees_a_change_made_before_its_dicts_were_watched(monkeypatch):
    """A change between the walk and the watching is in no count: the snapshot looks once more."""
    tree = _Tree()
    changed = []

    def watch_after_a_change(d):
        if not changed:
            tree.norm.weight = mx.zeros((4,))  # as another thread might, before any dict is watched
            changed.append(1)
        return True

    monkeypatch.setattr(dict_watch, "watch", watch_after_a_change)
    monkeypatch.setattr(dict_watch, "events", lambda: 0)
    assert not decode.TreeSnapshot(tree).current()


def test_the_step_python_benchmark_times_each_part_and_puts_everything_back():
    # importing it leaves the environment alone (it once set GEMMA4_MLX_COMPILE=1 for the whole process)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", "import os, bench.step_python; print(os.environ.get('GEMMA4_MLX_COMPILE'))"],
                       capture_output=True, text=True, timeout=120, cwd=root,
                       env={k: v for k, v in os.environ.items() if k != "GEMMA4_MLX_COMPILE"})
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stdout + r.stderr
    from bench import step_python

    before = (step_python.dispatch.run, decode.decoder_for, decode._switches, os.environ.get("GEMMA4_MLX_COMPILE"))
    line = step_python.measure("e2b", steps=5)
    assert line.startswith("e2b: model call ") and "RETRACED" not in line
    for part in ("switches", "snapshot", "decoder lookup", "step arguments", "check signature", "compiled replay"):
        assert re.search(rf"[( ]{part} \d+[,)]", line), part
    watched = sys.version_info >= (3, 12) and os.environ.get(dict_watch.ENV) != "0"
    assert line.endswith(f"dicts watched: {watched}")
    # the compiled step was on for the benchmark only (importing it once turned it on for the
    # rest of the test process)
    assert (step_python.dispatch.run, decode.decoder_for, decode._switches, os.environ.get("GEMMA4_MLX_COMPILE")) == before


def test_a_refused_watcher_means_the_scan():
    """CPython refuses a watcher when all 8 of an interpreter's slots are taken: no error, no count."""
    code = r"""
import ctypes, importlib.util, sys
keep = []
CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
ctypes.pythonapi.PyDict_AddWatcher.argtypes = [CB]
while True:  # take every free slot
    cb = CB(lambda *a: 0); keep.append(cb)
    try:
        ctypes.pythonapi.PyDict_AddWatcher(cb)
    except Exception:
        break
spec = importlib.util.spec_from_file_location("dict_watch", sys.argv[1])
dw = importlib.util.module_from_spec(spec); spec.loader.exec_module(dw)
print(dw.watch({}), dw.unavailable_reason())
"""
    pythons = _interpreters_312()
    if not pythons:
        pytest.skip("no CPython 3.12+ interpreter on this machine")
    r = subprocess.run([pythons[0], "-c", code, str(WATCH_FILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("False no dict watcher"), r.stdout + r.stderr


SIGINT_SCRIPT = r"""
import importlib.util, os, signal, sys, threading, time
spec = importlib.util.spec_from_file_location("dict_watch", sys.argv[1])
dw = importlib.util.module_from_spec(spec); spec.loader.exec_module(dw)
d = {}
assert dw.watch(d)
threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
start, n = time.time(), 0
try:
    while time.time() - start < 3:  # nearly all of the time inside changes of a watched dict
        for _ in range(1000):
            d["k"] = n
            n += 1
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", dw.events() >= n)
"""


def test_ctrl_c_during_changes_of_watched_dicts_is_not_lost():
    """The watcher's callback runs no Python frame: one that did (session 27's first form) had Ctrl-C
    raised inside it, where ctypes printed and dropped it (2 runs of 3 went on to the end here)."""
    pythons = _interpreters_312()
    if not pythons:
        pytest.skip("no CPython 3.12+ interpreter on this machine")
    for _ in range(6):  # the first form kept going in about half of its runs
        r = subprocess.run([pythons[0], "-c", SIGINT_SCRIPT, str(WATCH_FILE)], capture_output=True, text=True,
                           timeout=60)
        assert r.stdout.strip() == "interrupted True", r.stdout + r.stderr
