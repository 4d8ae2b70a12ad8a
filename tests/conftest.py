"""Shared fixtures: tiny Gemma 4 checkpoints written by HF transformers itself."""

from __future__ import annotations

import os
import signal
import sys

# The Ctrl-C tests need SIGINT at Python's own handler, here and in the commands they start. A shell without
# job control starts a background command (`... &`) with SIGINT ignored, which the children inherit: a test run
# started that way failed 12 of them (session 41). Restore the handler a fresh interpreter would install.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tests run on MLX's CPU backend and must not depend on a GPU being present.
os.environ.setdefault("GEMMA4_MLX_TEST", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "MLX_PTX_CACHE_DIR" not in os.environ:
    import mlx.core as _mx

    if not _mx.cuda.is_available():
        # Without a GPU, kernels forced to the CUDA path still seed MLX's cache folder: keep that
        # in a throwaway folder, not in /tmp/mlx (on the GPU, MLX's real cache is wanted).
        import atexit
        import shutil
        import tempfile

        os.environ["MLX_PTX_CACHE_DIR"] = tempfile.mkdtemp(prefix="gemma4-mlx-test-ptx-")
        atexit.register(shutil.rmtree, os.environ["MLX_PTX_CACHE_DIR"], True)


def _after_the_builds(write):
    """``write`` (os.putenv / os.unsetenv, which every change of os.environ calls), made to wait
    first for the NVRTC builds still running on the pool: NVRTC calls getenv while it compiles, and
    glibc's getenv is not safe against a putenv on another thread. A test may leave builds running
    (kernels prefetched, never launched) and monkeypatch then writes the environment at its undo
    and the next test's setup: CI once died of it (SIGSEGV in nvrtcCompileProgram on a pool thread
    while the main thread set up the next test). The package itself never writes the environment."""
    def guarded(*args):
        cuda_build = sys.modules.get("gemma4_mlx.kernels.cuda_build")
        if cuda_build is not None:
            cuda_build.wait_for_builds()
        return write(*args)

    return guarded


os.putenv, os.unsetenv = _after_the_builds(os.putenv), _after_the_builds(os.unsetenv)


def pytest_configure(config):
    config.addinivalue_line("markers", "reference: needs transformers + torch (the numerical reference)")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def qmv_size_rule(monkeypatch):
    """The test models are tiny: in tests the quantized matvec kernel takes products of every size.
    Yields the package's own size rule (qmv.MIN_VALUES), for the tests that check it."""
    from gemma4_mlx.kernels import qmv

    rule = qmv.MIN_VALUES
    monkeypatch.setattr(qmv, "MIN_VALUES", {})
    yield rule
