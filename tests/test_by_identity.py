"""kernels/by_identity.py: a value found again only by the very arrays it was put for, while they live
(qmv's packed weights and the closes' packed constants both keep their buffers in one)."""
import gc

import mlx.core as mx

from gemma4_mlx.kernels import qmv
from gemma4_mlx.kernels.by_identity import ByIdentity


def test_found_by_the_same_arrays_and_extras_only():
    a, b = mx.ones((4,)), mx.zeros((4,))
    found = ByIdentity()
    found.put((a, None, b), "value", (1e-6,))
    assert found.get((a, None, b), (1e-6,)) == "value"
    assert found.get((a, None, b), (1e-5,)) is None  # another extra
    assert found.get((a, b, None), (1e-6,)) is None  # another place for None
    assert found.get((a, None, mx.zeros((4,))), (1e-6,)) is None  # an equal array, not the same one
    found.discard((a, None, b), (1e-6,))
    assert found.get((a, None, b), (1e-6,)) is None and len(found) == 0


def test_an_entry_goes_with_any_of_its_arrays():
    a, b = mx.ones((4,)), mx.zeros((4,))
    found = ByIdentity()
    found.put((a, b), "value")
    found.put((a,), "other")
    del b
    gc.collect()
    assert len(found) == 1 and found.get((a,)) == "other"


def test_qmv_registers_and_unregisters_the_very_views():
    w, s, b = mx.quantize(mx.ones((8, 64)), group_size=64, bits=4)
    buffer = qmv.pack(w, s, b)
    views = qmv.unpack(buffer, w.shape, s.shape, s.dtype)
    mx.eval(buffer, *views)
    qmv.register_packed(buffer, *views)
    assert qmv.packed_buffer(*views) is buffer and qmv.packed_buffer(w, s, b) is None
    qmv.unregister_packed(*views)
    assert qmv.packed_buffer(*views) is None
