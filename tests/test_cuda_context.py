"""cuda_context.ensure_current: puts MLX's default device back where another GPU's context is current.

The failure it works around needs two GPUs (tests/test_sharding.py's mlx.launch test and
bench/gpu_session.sh `memloop` run it there); here a fake driver stands in for libcuda.
"""

import ctypes

import mlx.core as mx
import pytest

from gemma4_mlx import cuda_context


class FakeDriver:
    """libcuda's calls that ensure_current makes, over one thread's current device."""

    def __init__(self, current: int, devices: int = 2):
        self.current = current
        self.devices = devices
        self.calls = []

    def cuCtxGetDevice(self, out):
        self.calls.append("get")
        ctypes.cast(out, ctypes.POINTER(ctypes.c_int))[0] = self.current
        return 0

    def cuDevicePrimaryCtxRetain(self, out, ordinal):
        self.calls.append(("retain", ordinal))
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = 1000 + ordinal
        return 0

    def cuCtxSetCurrent(self, ctx):
        self.calls.append(("set", ctx.value))
        self.current = ctx.value - 1000
        return 0


@pytest.fixture
def gpu(monkeypatch):
    """MLX's default device reads as CUDA GPU 0 and the driver as the fake (two GPUs)."""
    cuda_context.reset()
    monkeypatch.setattr(cuda_context, "_default_ordinal", lambda: 0)
    yield monkeypatch
    cuda_context.reset()


def test_restores_the_default_device(gpu):
    fake = FakeDriver(current=1)
    gpu.setattr(cuda_context, "_load_driver", lambda: fake)
    cuda_context.ensure_current()
    assert fake.current == 0
    assert fake.calls == ["get", ("retain", 0), ("set", 1000)]
    fake.current = 1  # switched again: the retained context is reused
    fake.calls.clear()
    cuda_context.ensure_current()
    assert fake.current == 0 and fake.calls == ["get", ("set", 1000)]


def test_leaves_a_right_context_alone(gpu):
    fake = FakeDriver(current=0)
    gpu.setattr(cuda_context, "_load_driver", lambda: fake)
    cuda_context.ensure_current()
    cuda_context.ensure_current()
    assert fake.calls == ["get", "get"]


def test_one_gpu_asks_the_driver_once(gpu):
    loads = []

    def one_gpu():
        loads.append(1)
        return None  # _load_driver's answer with a single device

    gpu.setattr(cuda_context, "_load_driver", one_gpu)
    for _ in range(3):
        cuda_context.ensure_current()
    assert loads == [1]


def test_without_cuda_libcuda_is_never_opened(monkeypatch):
    """The CPU build (and Metal): decided once, without loading libcuda, and then nothing."""
    cuda_context.reset()
    monkeypatch.setattr(cuda_context.mx, "cuda", type("NoCuda", (), {"is_available": staticmethod(lambda: False)}))
    monkeypatch.setattr(cuda_context.ctypes, "CDLL", lambda *_: pytest.fail("libcuda opened without CUDA"))
    cuda_context.ensure_current()
    cuda_context.ensure_current()
    assert cuda_context._needed is False
    cuda_context.reset()


def test_default_ordinal_on_this_backend():
    # On the CPU (CI) there is no GPU ordinal; on a GPU it is the default one's.
    ordinal = cuda_context._default_ordinal()
    assert ordinal == (0 if mx.default_device() == mx.gpu else None)
