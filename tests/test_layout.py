"""The package's shape: no import cycle, and the wheel holds one top-level package, gemma4_mlx.

The kernel bodies sit in the repository's top-level ``custom_kernels/`` folder and install as
``gemma4_mlx.kernel_sources`` (``gemma4_mlx/kernel_sources`` is a relative symlink to it).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gemma4_mlx"
KERNEL_FILES = sorted(p.name for p in (ROOT / "custom_kernels").iterdir() if p.suffix in (".inc", ".h"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """Module -> the gemma4_mlx modules it imports, anywhere in its body (lazy imports count)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "kernel_sources" not in p.parts}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
                deps.update(submodules)
                if target in files and len(submodules) < len(node.names):
                    deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
        graph[name] = deps - {name}
    return graph


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"
    # Reading checkpoints never needs the writing side.
    for reader in ("gemma4_mlx.loading", "gemma4_mlx.safetensors_io", "gemma4_mlx.memory"):
        writing = {m for m in _reachable(graph, reader) if m.split(".")[:2] == ["gemma4_mlx", "checkpoint"]}
        assert not writing, (reader, writing)


def test_kernel_sources_link_to_the_top_level_folder():
    link = PACKAGE / "kernel_sources"
    assert link.is_symlink() and os.readlink(link) == "../custom_kernels"
    from gemma4_mlx.kernels import dispatch

    for name in KERNEL_FILES:
        assert dispatch.read_source(name) == (ROOT / "custom_kernels" / name).read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build writes beside them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("gemma4_mlx", "custom_kernels"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("gemma4_mlx-*.whl")
    return whl


def test_wheel_has_no_top_level_custom_kernels(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names}
        assert {t for t in top if not t.endswith(".dist-info")} == {"gemma4_mlx"}, top
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top_level:
            assert z.read(top_level[0]).decode().split() == ["gemma4_mlx"]
        for name in KERNEL_FILES:
            assert z.read(f"gemma4_mlx/kernel_sources/{name}") == (ROOT / "custom_kernels" / name).read_bytes()
    assert "gemma4_mlx/bench/run.py" in names and "gemma4_mlx/checkpoint/convert.py" in names


def test_kernel_sources_load_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    probe = f"""
import sys
sys.path.insert(0, {str(site)!r})
import gemma4_mlx
from gemma4_mlx.kernels import dispatch
assert gemma4_mlx.__file__.startswith({str(site)!r}), gemma4_mlx.__file__
for name in {KERNEL_FILES!r}:
    assert dispatch.read_source(name)
for backend in ("metal", "cuda"):
    head, src = dispatch.prelude(backend)
    assert "k_warp_sum" in head and "k_lane" in src
try:
    import custom_kernels
except ImportError:
    pass
else:
    raise AssertionError("a top-level custom_kernels package is importable: " + custom_kernels.__file__)
print("ok")
"""
    # Without PYTHONPATH: a checkout on it (a worktree run with PYTHONPATH=checkout) would make its
    # top-level custom_kernels folder importable whatever the wheel holds.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_no_bench_script_is_named_after_a_package_transformers_looks_for():
    """`python bench/X.py` puts bench/ first on the path, so a file there named after a package shadows it.
    transformers asks `is_<name>_available()` at import time and imports what it finds: bench/kernels.py was
    found as Hugging Face's `kernels` by transformers 5.25, and the later tests of that process that reached
    transformers failed."""
    import_utils = pytest.importorskip("transformers.utils.import_utils")
    probed = {n[len("is_"):-len("_available")] for n in vars(import_utils)
              if n.startswith("is_") and n.endswith("_available")}
    assert "kernels" in probed, "transformers no longer names its probes this way: the check below means nothing"
    bench = ROOT / "bench"
    scripts = {p.stem for p in bench.glob("*.py")} | {p.name for p in bench.iterdir() if p.is_dir()}
    assert not scripts & probed, sorted(scripts & probed)
