"""Capture the exact Metal source MLX generates for a kernel launch.

On a machine without Metal, a ``mx.fast.metal_kernel`` call made inside
``mx.export_function`` tracing still generates its source, and prints it when
the call passes ``verbose=True``. MLX prints from C++ to fd 1, so fd 1 is
redirected to a temporary file around the trace.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.kernels import dispatch

STUB = Path(__file__).with_name("metal_stub.h")

_BLOCK = re.compile(r"Generated source code for `([^`]*)`:\n```\n(.*?)\n```", re.S)
_INST = re.compile(r"^template \[\[host_name\(\"[^\"]*\"\)\]\] \[\[kernel\]\] (decltype\(.*)$", re.M)


def capture_stdout_fd(fn):
    """Run fn() with fd 1 redirected; return (result, captured text)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            result = fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", "replace")
    return result, text


def metal_sources(fn, *args) -> list[tuple[str, str]]:
    """[(kernel name, generated Metal source)] of every metal_kernel launched
    by fn(*args), traced with mx.export_function under a forced Metal backend."""

    def trace():
        with tempfile.TemporaryDirectory() as d, dispatch.force_backend("metal"), dispatch.verbose_kernels():
            mx.export_function(os.path.join(d, "f.mlxfn"), fn, *args)

    _, text = capture_stdout_fd(trace)
    return _BLOCK.findall(text)


def to_cpp(source: str) -> str:
    """MLX's Metal explicit instantiation -> a plain C++ one."""
    return _INST.sub(r"template \1", source)


def gxx_check(sources: list[str], gxx: str = "g++") -> tuple[int, str]:
    """Syntax-check the sources (one translation unit each, the stub
    included first); (return code, compiler output)."""
    out = []
    rc = 0
    with tempfile.TemporaryDirectory() as d:
        for i, src in enumerate(sources):
            path = Path(d) / f"k{i}.cpp"
            path.write_text(f'#include "{STUB}"\n' + to_cpp(src))
            p = subprocess.run(
                [gxx, "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-Werror=shadow", "-Werror=pedantic", str(path)],
                capture_output=True, text=True,
            )
            if p.returncode:
                rc = p.returncode
                out.append(p.stderr)
    return rc, "\n".join(out)
