"""The compiled one-token decode step, and the derived state it is built from.

Stock mlx-lm rebuilds the whole graph in Python for every generated token and runs each small op
as its own kernel. Here the decode step is traced once with ``mx.compile`` and replayed: MLX fuses
the elementwise chains, the custom GPU kernels replace op sequences, and q/k/v and gate/up
projections run as one matmul each ("joined" projections).

Everything that is *derived* from the model for this (the joined weights, the traced step, which
kernels passed their self-check) lives in one :class:`CompiledDecoder`, built from a snapshot of
the module tree and checked against the current tree at every call (:class:`TreeSnapshot`, ~50 us
for E2B). Whatever changes a module or a weight anywhere in the tree (mlx-lm's LoRA layers,
``load_adapters``, ``nn.quantize``, ``update``, ``load_weights``, ``set_dtype``, a layer replaced by
hand) or a switch (``GEMMA4_MLX_KERNELS``, ``_DISABLE``, ``_FUSE``) makes the next call build a new
decoder; the old one, its trace and its joined copies are released.

To keep shapes fixed from one token to the next, the step works on the caches' full buffers
(``KVCache``/``RotatingKVCache`` preallocate) instead of the ``[:offset]`` views: the new key/value
is written at a slot given as an array, and a mask hides the slots not yet filled. Between calls the
caches are left exactly as mlx-lm's own ``update_and_fetch`` would leave them (only their buffers
may be larger), so prompt-cache saving, trimming and batching keep working. A buffer that must grow
grows by a quarter of its size at least (a new shape means a new trace); :func:`reserve` sizes the
buffers for a whole generation up front, so a generation of known length is traced once.

Custom kernels run only inside the traced step. Their self-checks evaluate arrays, which tracing
forbids, so before the first trace a dry run of the step collects the kernels it would use
(without launching them) and checks them outside the trace: the first step is compiled like every
other one, and the same request gives the same tokens whatever ran before.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import cuda_context, dict_watch, ops, step_ints, switches
from .cache import SlidingWindowCache
from .step_context import _context, active

_CACHE_TYPES = (KVCache, RotatingKVCache, SlidingWindowCache)


def compile_enabled() -> bool:
    """``GEMMA4_MLX_COMPILE``: 1 / 0, or auto (default): on a GPU only. On the CPU the compiled
    step measured slower than the eager one (e2b-mini, float32, 2 cores: 77 against 74 ms per
    token, stock 74 ms), because there the time is the matmuls, not the per-op dispatch the
    compiled step removes."""
    return switches.gpu_default_flag("GEMMA4_MLX_COMPILE")


def joining_enabled() -> bool:
    """``GEMMA4_MLX_FUSE=0`` keeps q/k/v and gate/up apart in the decode step (ablations)."""
    return switches.env_flag("GEMMA4_MLX_FUSE")


def transposes_enabled() -> bool:
    """``GEMMA4_MLX_TRANSPOSES=0``: the decode step multiplies by ``weight.T`` as ``nn.Linear`` does,
    without :class:`TransposedWeights` (ablations)."""
    return switches.env_flag("GEMMA4_MLX_TRANSPOSES")


def shared_slots_enabled() -> bool:
    """``GEMMA4_MLX_SHARED_SLOTS=1`` (off by default until a GPU's compiled-against-eager tests and
    step timings have it, session 27): caches whose buffers have one shape and dtype and whose next
    slot and fill level are the same (every sliding layer's ring, every full layer's buffer: they
    take the same positions) share one slot index in the step, instead of one each: a Slice, a
    Reshape and a Broadcast fewer per cache (26B-A4B 84 of its step's ~920 primitives, E2B 39)."""
    return switches.env_flag("GEMMA4_MLX_SHARED_SLOTS", default=False)


def kv_scatter_enabled() -> bool:
    """``GEMMA4_MLX_KV_WRITE=slice``: the decode step writes each new key/value with
    ``mx.slice_update`` (its form until session 12) instead of a scatter (ablations)."""
    return (switches.env("GEMMA4_MLX_KV_WRITE") or "scatter").strip().lower() != "slice"


def _switches() -> tuple:
    """The settings a traced step depends on besides the module tree."""
    from .kernels import dispatch

    try:
        mode = dispatch.get_mode()
    except ValueError:
        mode = "invalid"
    from .kernels import close_params, cuda_build, mv, qmv
    from .kernels.attention import (BLOCKS_ENV, COMBINE_TILES_ENV, SPLIT_KEYS_ENV, SPLIT_MAJOR_ENV, TILE_ROWS_ENV,
                                    scratch_enabled)

    # the raw values of the launch-geometry switches read at the trace (checked where they are read)
    return (mode, tuple(sorted(dispatch.disabled_kernels())), dispatch.device_constants(), switches.env(qmv.MIN_VALUES_ENV),
            switches.env(mv.PROLOGUE_BLOCKS_ENV), switches.env(qmv.ROWS_ENV), switches.env(qmv.SPLIT_ENV),
            switches.env(qmv.WPL_ENV), switches.env(SPLIT_KEYS_ENV),
            switches.env(TILE_ROWS_ENV), switches.env(BLOCKS_ENV), switches.env(COMBINE_TILES_ENV),
            switches.env(SPLIT_MAJOR_ENV), joining_enabled(), transposes_enabled(), kv_scatter_enabled(),
            switches.env(qmv.PACK_ENV), switches.env(qmv.GATE_PACK_ENV),
            ops.expert_indices_enabled(), cuda_build.short_sources(), dispatch.form_signatures(), shared_slots_enabled(),
            step_ints.enabled(), scratch_enabled(), close_params.enabled(), mv.close_rows_enabled(),
            mx.default_device())


# ------------------------------------------------------------------ derived state

_SCALARS = (int, float, bool, str, type(None))


def _settings(module: nn.Module) -> tuple:
    """A module's plain Python settings (a LoRA layer's ``scale``, a flag): its non-array
    attributes of scalar value, or tuples of them."""
    return tuple((k, v) for k, v in vars(module).items()
                 if isinstance(v, _SCALARS) or (isinstance(v, tuple) and all(isinstance(x, _SCALARS) for x in v)))


def _watched(module: nn.Module) -> bool:
    """Modules from outside MLX's layers and ours (mlx-lm's LoRA/DoRA layers, a user's own) may
    have settings that are edited in place and change what they compute; ours and MLX's take
    theirs from the config and the arrays."""
    return not type(module).__module__.startswith(("gemma4_mlx.", "mlx.nn."))


class TreeSnapshot:
    """The identity of every module, list, dict and array in a module tree, the size of every
    container, and the plain settings of every module not from MLX or this package, at one
    moment. :meth:`current` says whether the tree still holds exactly those.

    It is asked at every decode step, where looking at every container touches ~1,200-2,000
    scattered objects (E2B / 26B-A4B: 70-180 us in a loop of looks alone, 0.25-1 ms between real
    steps on a 2-core CPU, which leave little of them in its caches). So, where
    CPython can (3.12+, :mod:`.dict_watch`), every dict of the tree is watched: while none has
    changed since the tree was last found current, only its lists are looked at. A module's
    settings are compared as values (a setting written again with an equal value changes
    nothing), which means building them anew from its attributes; first every attribute of
    those modules is compared by identity with what it was when last found current, and only
    where one differs are the settings built and compared."""

    def __init__(self, root: nn.Module):
        containers, keys, values = [], [], []
        sizes, watched = [], []

        def walk(node):
            sizes.append((node, len(node)))
            if isinstance(node, nn.Module) and _watched(node):
                watched.append((node, _settings(node)))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                if isinstance(v, (mx.array, dict, list)):
                    containers.append(node)
                    keys.append(k)
                    values.append(v)
                    if not isinstance(v, mx.array):
                        walk(v)

        walk(root)
        self._containers, self._keys, self._values = containers, keys, values
        self._sized = [n for n, _ in sizes]
        self._sizes = [s for _, s in sizes]
        self._watched = watched
        self._attributes = [vars(m) for m, _ in watched]
        self._dicts_watched = all([dict_watch.watch(n) for n in self._sized if isinstance(n, dict)])
        # what the quick look compares item by item besides the counts: the lists, where the dicts are
        # counted (unwatched, the full look at every container has covered them already)
        self._lists = [n for n in self._sized if isinstance(n, list)] if self._dicts_watched else []
        # the watched modules' attributes too, where writing one is counted (CPython 3.12, not 3.13)
        self._attributes_watched = (self._dicts_watched and dict_watch.counts_attribute_writes()
                                    and all([dict_watch.watch(a) for a in self._attributes]))
        self._events = dict_watch.events() if self._dicts_watched else None
        # a change between the walk and the watching was not counted: one look, now that they are
        # watched and the count read (None never equals a count: the next look is the exact rule)
        if self._dicts_watched and not self._exactly_current():
            self._events = None
        self._record()

    def _record(self) -> None:
        """What the quick look compares with: the lists' items, the watched modules' attributes
        (unless their writes are counted)."""
        self._list_items = tuple(itertools.chain.from_iterable(self._lists))
        self._list_sizes = list(map(len, self._lists))
        looked_at = [] if self._attributes_watched else self._attributes
        self._looked_at = looked_at
        self._attribute_values = tuple(itertools.chain.from_iterable(map(dict.values, looked_at)))
        self._attribute_sizes = list(map(len, looked_at))

    def _as_recorded(self, dicts_unchanged: bool) -> bool:
        # sizes first: then the chained items line up with the record one for one
        return (dicts_unchanged and list(map(len, self._lists)) == self._list_sizes
                and all(map(operator.is_, itertools.chain.from_iterable(self._lists), self._list_items))
                and list(map(len, self._looked_at)) == self._attribute_sizes
                and all(map(operator.is_, itertools.chain.from_iterable(map(dict.values, self._looked_at)),
                            self._attribute_values)))

    def _exactly_current(self) -> bool:
        return self._identities_hold() and all(_settings(m) == settings for m, settings in self._watched)

    def current(self) -> bool:
        events = dict_watch.events() if self._dicts_watched else None
        if self._as_recorded(self._events == events if self._dicts_watched else self._identities_hold()):
            return True
        if not self._exactly_current():
            return False
        # still current (a dict changed and changed back, a setting written again with an equal
        # value, a change elsewhere in the process): the quick look starts from here
        self._events = events
        self._record()
        return True

    def _identities_hold(self) -> bool:
        """Every tracked item and every container's size as recorded (what watched dicts answer
        for their part without a look)."""
        try:
            same = all(map(operator.is_, map(operator.getitem, self._containers, self._keys), self._values))
        except (KeyError, IndexError):
            return False
        return same and list(map(len, self._sized)) == self._sizes


# MLX's CUDA backend (0.32; mlx/backend/cuda/quantized/quantized.cpp) gives a one-row quantized
# matmul its matrix-vector kernel on sm90 GPUs only up to 16,384 outputs and 16,384 inputs; past
# that it takes the tiled GEMM (qmm_sm90). A joined projection must not push members that each
# stay under the line over it: E2B's double-wide gate/up (2 x 12,288) and 31B's global q/k
# (16,384 + 2,048) would leave the matrix-vector kernel, where stock's separate ones keep it.
CUDA_QMV_MAX = 16384


def _sm90_quantized_dispatch() -> bool:
    from .kernels import cuda_build, dispatch

    return dispatch.active_backend() == "cuda" and cuda_build.target_arch().startswith("sm_9")


def _joint_keeps_qmv(members: List[nn.Module]) -> bool:
    """Joining these quantized projections moves none of them off MLX's matrix-vector kernel (or
    the joint is large enough for ours: qmv's size rule, qmv on)."""
    if not _sm90_quantized_dispatch():
        return True
    from .kernels import dispatch, qmv as qmv_kernel

    inputs = members[0]["scales"].shape[-1] * members[0].group_size
    rows = [m["weight"].shape[0] for m in members]
    ours = dispatch.get_mode() != "off" and not dispatch.is_disabled("qmv")
    if ours and qmv_kernel.takes(sum(rows) * inputs, members[0].bits, "cuda"):
        return True  # E4B's gate/up (2 x 10,240 x 2,560) joined: our kernel runs it, and its GeGLU

    def qmv(n: int) -> bool:
        return n <= CUDA_QMV_MAX and inputs <= CUDA_QMV_MAX

    return qmv(sum(rows)) or not any(qmv(n) for n in rows)


def _projection_keys(module: nn.Module) -> List[str]:
    return [k for k in ("weight", "scales", "biases") if k in module]


class JoinedProjection:
    """Projections of one input (q/k/v, gate/up) as one matrix.

    The members' weights become row slices (views) of the joined matrix, so it costs no second
    copy of the weights, and parameter names, saved files and weight sharing stay as they were.
    It belongs to one :class:`CompiledDecoder`: :meth:`holds` says whether ``owner`` still has
    these very members holding these very views.
    """

    def __init__(self, owner: nn.Module, names: List[str]):
        """The joined matrix, lazy: :meth:`adopt` makes the members its views once it is evaluated.
        A quantized one with packing on (kernels/qmv.py's QPACK) is three views of one buffer."""
        from .kernels import qmv

        members = [owner[n] for n in names]
        first = members[0]
        keys = _projection_keys(first)
        joint = type(first).__new__(type(first))
        nn.Module.__init__(joint)
        if isinstance(first, nn.QuantizedLinear):
            joint.group_size, joint.bits, joint.mode = first.group_size, first.bits, first.mode
        for k in keys:
            joint[k] = mx.concatenate([m[k] for m in members], axis=0)
        self.packed = _packs(joint) and qmv.packing_enabled()
        self.buffer = None
        if self.packed:
            self.buffer = qmv.pack(joint["weight"], joint["scales"], joint["biases"])
            if self.buffer is None:
                self.packed = False
            else:
                views = qmv.unpack(self.buffer, joint["weight"].shape, joint["scales"].shape, joint["scales"].dtype)
                for k, v in zip(("weight", "scales", "biases"), views):
                    joint[k] = v
        sizes = [m["weight"].shape[0] for m in members]
        self.splits = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
        self.joint = joint
        self.owner = owner
        self._names, self._members, self._keys, self._sizes = names, members, keys, sizes
        self._slots = []

    def nbytes(self) -> int:
        return sum(self.joint[k].nbytes for k in self._keys)

    def arrays(self):
        return self.joint.parameters()

    def adopt(self) -> None:
        """After the joint is evaluated: the members' weights become its row slices (their own
        arrays are let go)."""
        if self.buffer is not None:
            from .kernels import qmv

            qmv.register_packed(self.buffer, self.joint["weight"], self.joint["scales"], self.joint["biases"])
        start = 0
        for m, n in zip(self._members, self._sizes):
            for k in self._keys:
                m[k] = self.joint[k][start : start + n]
            start += n
        self._slots = [(self.owner, name, m, [m[k] for k in self._keys], self._keys)
                       for name, m in zip(self._names, self._members)]
        del self._members

    def member_modules(self) -> List[nn.Module]:
        """The member projections (after :meth:`adopt`)."""
        return [m for _, _, m, _, _ in self._slots]

    @staticmethod
    def compatible(members: List[nn.Module]) -> bool:
        if len(members) < 2:
            return False
        first = members[0]
        # exact types: a LoRA layer, a DoRA layer or any other subclass computes something else
        if type(first) not in (nn.Linear, nn.QuantizedLinear):
            return False
        if any(type(m) is not type(first) or "bias" in m for m in members):
            return False
        if type(first) is nn.QuantizedLinear:
            if any((m.group_size, m.bits, m.mode) != (first.group_size, first.bits, first.mode) for m in members):
                return False
            if any(_projection_keys(m) != _projection_keys(first) for m in members):
                return False
            if not _joint_keeps_qmv(members):
                return False
        return len({(m["weight"].dtype, m["weight"].shape[1]) for m in members}) == 1

    def holds(self) -> bool:
        return all(
            owner.get(name) is m and all(m.get(k) is v for k, v in zip(keys, views))
            for owner, name, m, views, keys in self._slots
        )

    def geglu(self, x: mx.array) -> mx.array:
        """``geglu(gate, up)`` of a gate/up join: one matvec launch with the gate inside the decode
        step when the matvec kernels are on (``ops.linear_geglu``), else the join and MLX's GeGLU."""

        def unfused(x):
            if self.halves:
                return ops.geglu_joined(ops.linear(self.joint, x))
            gate, up = self(x)
            return ops.geglu(gate, up)

        return ops.linear_geglu(self.joint, x, unfused) if self.halves else unfused(x)

    @property
    def halves(self) -> bool:
        """Two members of equal height (gate and up): the joined matrix is [gate rows; up rows]."""
        return len(self.splits) == 1 and 2 * self.splits[0] == self.joint["weight"].shape[0]

    def __call__(self, x: mx.array, head_dim: int = 0) -> List[mx.array]:
        """The members' outputs; with ``head_dim``, each already split into heads (B, L, heads,
        head_dim): one Reshape of the joined output rather than one per member."""
        return self.split(ops.linear(self.joint, x), head_dim)

    def split(self, y: mx.array, head_dim: int = 0) -> List[mx.array]:
        """The members' outputs from the joined product ``y`` (see :meth:`__call__`)."""
        if not head_dim:
            return mx.split(y, self.splits, axis=-1)
        y = y.reshape(*y.shape[:-1], -1, head_dim)
        return mx.split(y, [s // head_dim for s in self.splits], axis=-2)


def join_projections(model, previous: Dict[int, JoinedProjection]) -> Dict[int, JoinedProjection]:
    """Joined q/k/v and gate/up projections of every layer, reusing those of ``previous`` that
    still hold (so rebuilding after an unrelated change copies nothing)."""
    out: Dict[int, JoinedProjection] = {}
    if not joining_enabled():
        return out
    new: List[JoinedProjection] = []
    for layer in model.layers:
        for module, names in ((layer.self_attn, ["q_proj", "k_proj", "v_proj"]), (layer.mlp, ["gate_proj", "up_proj"])):
            names = [n for n in names if n in module]
            old = previous.get(id(module))
            if old is not None and old.owner is module and old.holds() and old.packed == _packing(old.joint):
                out[id(module)] = old
            elif JoinedProjection.compatible([module[n] for n in names]):
                out[id(module)] = JoinedProjection(module, names)
                new.append(out[id(module)])
    _evaluate_in_groups(new)
    return out


JOIN_GROUPS = 8


def _packs(module: nn.Module) -> bool:
    """A projection whose three arrays the 4/8-bit matvecs may take as one buffer (kernels/qmv.py's QPACK)."""
    return ops.affine_quantized(module) and module.bits in (4, 8)


def _packing(module: nn.Module) -> bool:
    from .kernels import qmv

    return _packs(module) and qmv.packing_enabled()


class PackedWeights:
    """Every exact 4/8-bit ``nn.QuantizedLinear`` outside a join with its words, scales and biases in
    one buffer (kernels/qmv.py's QPACK; a join packs its own, :class:`JoinedProjection`): the
    module's three arrays become views of it (no second copy; names, saved files and sharing stay as
    they were), and the step's matvecs take the buffer alone, one input where there were three.
    Reuses ``previous``'s buffer of a module that still holds its views."""

    def __init__(self, model: nn.Module, joined: Dict[int, "JoinedProjection"], previous: Optional["PackedWeights"]):
        from .kernels import qmv

        self._held: Dict[int, tuple] = {}  # id(module) -> (module, its three views)
        kept = previous._held if previous is not None else {}
        in_joins = {id(m) for j in joined.values() for m in j.member_modules()}
        new = []
        on = qmv.packing_enabled()
        for _, m in model.named_modules():
            if not on and _packs(m):  # switched off: views a decoder packed before go to the kernels apart
                qmv.unregister_packed(m["weight"], m["scales"], m["biases"])
            if id(m) in in_joins or not on or not _packs(m):
                continue
            old = kept.get(id(m))
            if old is not None and old[0] is m and all(m.get(k) is v for k, v in zip(_PACKED_KEYS, old[1])):
                self._held[id(m)] = old
                continue
            buffer = qmv.pack(m["weight"], m["scales"], m["biases"])
            if buffer is not None:
                new.append(_PackedModule(m, buffer))
        _evaluate_in_groups(new)
        for p in new:
            self._held[id(p.module)] = (p.module, p.views)


class _PackedModule:
    """One module's buffer and its three views, lazy until :func:`_evaluate_in_groups` evaluates them
    and :meth:`adopt` hands the views to the module."""

    def __init__(self, module: nn.Module, buffer: mx.array):
        from .kernels import qmv

        self.module, self.buffer = module, buffer
        self.views = qmv.unpack(buffer, module["weight"].shape, module["scales"].shape, module["scales"].dtype)

    def nbytes(self) -> int:
        return self.buffer.nbytes

    def arrays(self) -> list:
        return [self.buffer, *self.views]

    def adopt(self) -> None:
        from .kernels import qmv

        qmv.register_packed(self.buffer, *self.views)
        for k, v in zip(_PACKED_KEYS, self.views):
            self.module[k] = v


_PACKED_KEYS = ("weight", "scales", "biases")


def _evaluate_in_groups(joins: list) -> None:
    """Evaluate the new joints (:class:`JoinedProjection`, :class:`_PackedModule`) about an eighth of
    their bytes at a time, then let each adopt its members. Until a joint is adopted its members' own
    arrays live too (read from the files when the weights are still lazy, at load), so a group's bytes
    count twice: an eighth keeps the transient to a quarter of the joined bytes. Not one module at a
    time: at load on the H200, 70 evaluations of a few weights each took 1.6 s of E2B's `load()`
    (session 13's loadprof)."""
    if not joins:
        return
    sizes = [j.nbytes() for j in joins]
    budget = max(max(sizes), sum(sizes) // JOIN_GROUPS)
    group, held = [], 0
    for j, n in zip(joins, sizes):
        if group and held + n > budget:
            _evaluate(group)
            group, held = [], 0
        group.append(j)
        held += n
    _evaluate(group)


def _evaluate(group: list) -> None:
    mx.eval([j.arrays() for j in group])
    for j in group:
        j.adopt()


class TransposedWeights:
    """The transposes of the weights the step multiplies by: every exact ``nn.Linear`` without bias
    (joined projections included) and an ``nn.Embedding`` (the tied head), as views made here and
    evaluated before the trace (free: a view of an evaluated array shares its buffer).

    Every primitive of the traced step is replayed and evaluated at each token, at a host cost
    (views included); on the GPU the step is bound by that. ``nn.Linear`` computes
    ``x @ weight.T``: traced as is, a projection of a (B, L, D) activation is four primitives
    (Transpose, Flatten, Matmul, Unflatten). Against an evaluated transpose there is no Transpose;
    against a (1, D, N) one, for a single row of activations (B = 1, the usual decode), no
    Flatten/Unflatten either: a batch-of-one matmul, the same product. With B > 1 the 2-D view
    keeps one matmul over all rows (a batched one would read the weights once per row). On the
    CI machine's CPU: 2.1 us of host time per projection against 5.3 us.
    """

    def __init__(self, model: nn.Module, joined: Dict[int, "JoinedProjection"]):
        modules = [m for _, m in model.named_modules()] + [j.joint for j in joined.values()]
        self._views = {}
        for m in modules if transposes_enabled() else []:
            if ops.plain_linear(m) or type(m) is nn.Embedding:
                t = m["weight"].T
                self._views[id(m)] = (m, m["weight"], t, t[None])
        self._evaluated = False

    def evaluate(self) -> None:
        """Before a trace: a lazy view would be traced as a Transpose after all."""
        if not self._evaluated:
            mx.eval([v for entry in self._views.values() for v in entry[2:]])
            self._evaluated = True

    def matmul(self, module: nn.Module, x: mx.array) -> Optional[mx.array]:
        """``x @ module.weight.T`` over the views, or None when this step holds none for the
        module as it is now."""
        entry = self._views.get(id(module))
        if entry is None or entry[0] is not module or module.get("weight") is not entry[1]:
            return None
        return x @ (entry[3] if x.ndim == 3 and x.shape[0] == 1 else entry[2])


class StepScalars:
    """The model's size-1 parameters (each layer's ``layer_scalar``) stacked per dtype into one
    array, evaluated before the trace; inside it one Split per stack hands each out.

    mx.compile bakes a size-1 array without a primitive into the source of the element-wise kernel
    it fuses it into and names the kernel after its value: a trained checkpoint's per-layer
    scalars made one fused kernel per layer, each JIT-compiled by MLX on a fresh GPU machine. A
    Split's piece has a primitive, so it is the kernel's argument and the layers share one kernel;
    one Split for all layers, not a primitive per layer (each is replayed at every token).
    """

    def __init__(self, model: nn.Module):
        from mlx.utils import tree_flatten

        groups: Dict[Any, list] = {}
        for _, p in tree_flatten(model.parameters()):
            if p.size == 1:
                groups.setdefault(p.dtype, []).append(p)
        self._where = {}  # id -> (the array, its stack, its index)
        self._stacks = []
        for arrays in groups.values():
            if len(arrays) < 2:
                continue  # a Split of one would hand back the stack itself, a constant again
            stack = mx.concatenate([a.reshape(1) for a in arrays])
            self._stacks.append(stack)
            for i, a in enumerate(arrays):
                self._where[id(a)] = (a, stack, i)
        self._evaluated = False

    def evaluate(self) -> None:
        """Before a trace: a lazy stack would be traced as its Concatenate after all."""
        if not self._evaluated:
            mx.eval(self._stacks)
            self._evaluated = True

    def piece(self, array: mx.array, pieces: Dict[int, list]) -> Optional[mx.array]:
        """``array``'s piece of its stack's Split (made once per trace, kept in ``pieces``), or
        None when ``array`` is not one of the stacked ones."""
        entry = self._where.get(id(array))
        if entry is None or entry[0] is not array:
            return None
        _, stack, i = entry
        if id(stack) not in pieces:
            pieces[id(stack)] = mx.split(stack, stack.size)
        return pieces[id(stack)][i]


# ------------------------------------------------------------------ caches inside the step

class _SlotCache:
    """Stands in for a cache inside the traced step: write at ``slot``, mask unfilled slots."""

    def __init__(self, keys: mx.array, values: mx.array, slot: mx.array, valid: mx.array, offset: mx.array,
                 ring_window: Optional[int] = None, scatter: bool = True, indices: Optional[dict] = None):
        self.keys, self.values = keys, values
        self.scatter = scatter
        self.slot, self.valid, self.offset = slot, valid, offset
        # A SlidingWindowCache with spare slots: its ring holds more than the window.
        self.ring_window = ring_window
        # the scatter's index for (slot, update shape), shared by the caches of one step that take
        # the same slot array (GEMMA4_MLX_SHARED_SLOTS)
        self._indices = {} if indices is None else indices

    def _index(self, shape) -> mx.array:
        key = (id(self.slot), tuple(shape))
        index = self._indices.get(key)
        if index is None:
            index = self._indices[key] = mx.broadcast_to(self.slot.reshape(1, 1, 1, 1), shape)
        return index

    def update_and_fetch(self, k: mx.array, v: mx.array):
        if not self.scatter:
            self.keys = mx.slice_update(self.keys, k, self.slot, axes=(2,))
            self.values = mx.slice_update(self.values, v, self.slot, axes=(2,))
            return self.keys, self.values
        # A scatter along the position axis, not mx.slice_update: MLX 0.32's CUDA DynamicSliceUpdate
        # launches one thread per element of the whole buffer (not of the update), ~23 us per write
        # for a 512-slot window and growing with the context (H200, bench/step_profile.py).
        slot = self._index(k.shape)
        self.keys = mx.put_along_axis(self.keys, slot, k, axis=2)
        self.values = mx.put_along_axis(self.values, slot, v, axis=2)
        return self.keys, self.values

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        # Every filled slot is inside the window: a rotating buffer holds exactly the window,
        # unless it has spare slots; then those further behind than the window are hidden too.
        n = self.keys.shape[2]
        filled = mx.arange(n) < self.valid
        if self.ring_window is None:
            return filled
        return filled & (mx.remainder(self.slot - mx.arange(n), n) < self.ring_window)


def _grow(buf: mx.array, keep: int, extra: int) -> mx.array:
    B, H, _, D = buf.shape
    return mx.concatenate([buf[..., :keep, :], mx.zeros((B, H, extra, D), buf.dtype)], axis=2)


class _NeedsEager(Exception):
    pass


def _reserve_slot(cache) -> tuple[int, int]:
    """Grow/trim/rotate ``cache`` as its own ``update_and_fetch`` does for one token, short of
    writing it; return (slot to write, number of valid slots after the write). A full KVCache
    grows by a quarter of its size at least (each new size is a new trace)."""
    if cache.keys is None:
        raise _NeedsEager
    if type(cache) is SlidingWindowCache:
        return cache.reserve_slot()
    prev = cache.offset
    if type(cache) is KVCache:
        size = cache.keys.shape[2]
        if prev + 1 > size:
            step = cache.step
            extra = max(step, -(-(size // 4) // step) * step)
            cache.keys = _grow(cache.keys, prev, extra + size - prev)
            cache.values = _grow(cache.values, prev, extra + size - prev)
        return prev, prev + 1
    # RotatingKVCache
    if cache.keep != 0:
        raise _NeedsEager
    size = cache.keys.shape[2]
    if prev >= size and size < cache.max_size:
        extra = min(cache.step, cache.max_size - prev)
        cache.keys = _grow(cache.keys, size, extra)
        cache.values = _grow(cache.values, size, extra)
        cache._idx = prev
    trim = cache.keys.shape[2] - cache.max_size
    if trim > 0:  # after a chunked prefill the buffer holds max_size - 1 + chunk tokens in order
        cache.keys = cache._trim(trim, cache.keys)
        cache.values = cache._trim(trim, cache.values)
        cache._idx = cache.max_size
    if cache._idx == cache.max_size:
        cache._idx = 0
    return cache._idx, min(prev + 1, cache.keys.shape[2])


CAPACITY_STEP = 1024
# New tokens reserved up front at most: a generation asked for more (and perhaps stopping far
# earlier) grows its buffers as it goes instead of holding them all from the start.
MAX_RESERVED_NEW = 8192


def reserve(cache: List[Any], prompt_tokens: int, new_tokens: int) -> None:
    """Size the caches' buffers for ``prompt_tokens`` (cached + prompt) + ``new_tokens`` (at most
    ``MAX_RESERVED_NEW``): a full-attention buffer that must grow grows by the whole capacity
    (rounded up to ``CAPACITY_STEP``, so requests of similar length share a traced step), so a
    fresh cache is allocated once by the first prefill chunk; a ``RotatingKVCache`` grows straight
    to its window (our ``SlidingWindowCache`` holds its whole ring from the start). The decode step then keeps one shape for the whole generation (one
    trace, no stall mid-way), and the prefill copies no buffer to grow it."""
    total = int(prompt_tokens) + min(int(new_tokens), MAX_RESERVED_NEW)
    capacity = max(CAPACITY_STEP, -(-total // CAPACITY_STEP) * CAPACITY_STEP)
    for c in cache or []:
        if type(c) is KVCache:
            c.step = capacity
        elif type(c) is RotatingKVCache:
            c.step = max(c.step, c.max_size)


# ------------------------------------------------------------------ the compiled step

_SHAPE_AND_DTYPE = operator.attrgetter("shape", "dtype")  # a buffer's part of a step signature, read in C


def _step_function(model_ref, counts: dict, ints_ahead: bool):
    def forward(inputs, offset, slots, valid, buffers, ring_windows, groups):
        ctx = active()
        if ctx is not None and ctx.tracing:
            counts["traces"] += 1
        n = len(buffers) // 2
        g = max(groups) + 1  # the caches' slot groups (CompiledDecoder.step_args): each its own by default
        ahead = None
        if slots is None:  # the per-token integers packed in device memory (dispatch.device_constants),
            # which every kernel reads, instead of each reading the host's managed buffer; and, where the
            # decoder takes them (ints_ahead), the next token's, worked out here (step_ints)
            packed = offset
            if ints_ahead:
                from .kernels import dispatch

                limit, reset = step_ints.bounds(step_ints.group_sizes(buffers, groups))

                def row(a):  # the rule over rows: one fused launch with device_copy's product
                    return a.reshape(1, -1)

                ahead = dispatch.device_copy(step_ints.advance(row(packed), row(dispatch.constant(limit, mx.int32)),
                                                               row(dispatch.constant(reset, mx.int32)), mx))
            offset, slots, valid = mx.split(packed, [1, 1 + g])
            offset = offset.reshape(())
        # each cache's slot and fill level as (1,) views, one Split each for all caches: an index
        # per cache was a Slice, and a Gather (a launch) and a Squeeze, and the attention kernel
        # reshaped the scalar fill level of its producer layer's cache for every layer
        # (session 23's split into trees of at most 10 pieces, the (1,) position and the kernels' 1-d
        # inputs passed as they are broke batched compiled decode on the H200 and are undone:
        # docs/benchmarks.md, session 24)
        slot_of = mx.split(slots, g) if g > 1 else [slots]
        valid_of = mx.split(valid, g) if g > 1 else [valid]
        scatter = kv_scatter_enabled()
        indices: dict = {}
        caches = [
            _SlotCache(buffers[2 * i], buffers[2 * i + 1], slot_of[groups[i]], valid_of[groups[i]], offset,
                       ring_windows[i], scatter, indices)
            for i in range(n)
        ]
        logits = model_ref()._eager(inputs, cache=caches)
        out = []
        for c in caches:
            out += [c.keys, c.values]
        if ahead is not None:
            out.append(ahead)
        return logits, out

    return forward


class CompiledDecoder:
    """Runs ``model`` for one token per row through a compiled step when the caches allow it.

    Built from the model as it is now (see the module docstring); :meth:`current` says whether
    the model and the switches are still what it was built from.
    """

    def __init__(self, model, previous: Optional["CompiledDecoder"] = None):
        self.switches = _switches()
        self.joined = join_projections(model, previous.joined if previous is not None else {})
        self.packed = PackedWeights(model, self.joined, previous.packed if previous is not None else None)
        self.snapshot = TreeSnapshot(model)  # after joining and packing: the members now hold views
        self.transposed = TransposedWeights(model, self.joined)
        self.scalars = StepScalars(model)
        from .kernels import dispatch

        # read once a decoder (the switch is one of _switches(): a change builds a new decoder)
        self.packed_ints = dispatch.device_constants()
        # the next token's integers from the step's own output where they are the host's (step_ints)
        self.ints_ahead = step_ints.IntsAhead() if self.packed_ints and step_ints.enabled() else None
        self.shared_slots = shared_slots_enabled()  # likewise one of _switches()
        # The traced function reaches the model through a weak reference: the model holds its
        # decoder, and a strong one would keep both alive until a garbage collection.
        self.counts = {"traces": 0}  # how often the step was traced (tests, benchmarks)
        self._forward = _step_function(weakref.ref(model), self.counts, self.ints_ahead is not None)
        self._step = mx.compile(self._forward)
        self._checked: set = set()  # step signatures whose kernels were checked before their trace

    def current(self) -> bool:
        return self.switches == _switches() and self.snapshot.current()

    def collect_kernels(self, args) -> tuple:
        """Dry-run the step (a graph that is never evaluated): ``(needed, fallbacks)``, the kernels it
        would use and those it would use only where one of them fails its check (met only in their
        fallbacks: :func:`.kernels.dispatch.check_all`), one entry a kernel and shape class (the first
        call site's). Every layer's call of a class is collected; the builds' prefetch made each one's
        probe, ~0.2 s of E2B 4-bit's first token on the H200 (session 39's profile: 430 packed probes,
        an evaluation each, for ~30 classes)."""
        needed: list = []
        with _context(self.joined, collect=needed, transposed=self.transposed, scalars=self.scalars) as step:
            self._forward(*args)
        distinct: dict = {}
        for entry in needed:
            distinct.setdefault(entry[1], entry)
        fallbacks: dict = {}
        for entry in step.fallback_collect:
            if entry[1] not in distinct:
                fallbacks.setdefault(entry[1], entry)
        return list(distinct.values()), list(fallbacks.values())

    def _check_kernels(self, args) -> None:
        """Self-check every kernel the step uses, outside any trace: once per step signature,
        i.e. before each trace (the checks' verdicts live in the kernels' dispatcher; a check
        already made is not repeated)."""
        from .kernels import dispatch

        inputs, _, _, _, buffers, ring_windows, groups = args
        signature = (inputs.shape, inputs.dtype, tuple(map(_SHAPE_AND_DTYPE, buffers)), ring_windows, groups)
        if signature not in self._checked:
            dispatch.check_all(*self.collect_kernels(args))
            self._checked.add(signature)

    @staticmethod
    def step_args(cache: List[Any], inputs: mx.array, packed: bool = False, shared: bool = False):
        """The compiled step's arguments for one token per row over ``cache`` (which it grows,
        trims or rotates as a write would), and the reserved (slot, valid) pairs; None where the
        caches need the eager path. ``packed``: the position, slots and fill levels as one array
        (the decoder's ``packed_ints``). ``shared`` (the decoder's ``shared_slots``): caches of one
        buffer shape, dtype and ring whose (slot, valid) are the same now take one slot group (the
        grouping is a static argument of the trace: should it ever change, the step is traced again)."""
        if inputs.shape[1] != 1 or not cache or any(type(c) not in _CACHE_TYPES for c in cache):
            return None
        offsets = {c.offset for c in cache}
        if len(offsets) != 1:
            return None
        try:
            reserved = [_reserve_slot(c) for c in cache]
        except _NeedsEager:
            return None
        cuda_context.ensure_current()  # host-made arrays below: see cuda_context
        # One id dtype for every step. A generation's first step usually gets the prompt's last id
        # (int32, from the tokenizer) and every later one a sampled id (uint32): two dtypes were
        # two traces, and on a fresh GPU machine two sets of MLX-compiled kernels. (A negative id
        # wraps high; the model clamps ids to the table either way.)
        ids = inputs if inputs.dtype == mx.uint32 else inputs.astype(mx.uint32)
        # a ring with spare slots (speculative decoding) also masks by distance to the window
        ring_windows = tuple(c.window if type(c) is SlidingWindowCache and c.reserve else None for c in cache)
        buffers = []
        for c in cache:
            buffers += [c.keys, c.values]
        if shared:
            first: dict = {}
            groups = tuple(first.setdefault((c.keys.shape, c.keys.dtype, w, r), len(first))
                           for c, w, r in zip(cache, ring_windows, reserved))
            pairs = [key[3] for key in first]  # each group's (slot, valid), in group order
        else:
            groups, pairs = tuple(range(len(cache))), reserved
        if packed:  # the integers as a tuple, put in device memory by the decoder (device_ints)
            packed = (offsets.pop(),) + tuple(s for s, _ in pairs) + tuple(v for _, v in pairs)
            return (ids, packed, None, None, buffers, ring_windows, groups), reserved
        slots = mx.array([s for s, _ in pairs], dtype=mx.int32)
        valid = mx.array([v for _, v in pairs], dtype=mx.int32)
        return (ids, mx.array(offsets.pop(), dtype=mx.int32), slots, valid, buffers, ring_windows, groups), reserved

    def device_ints(self, args: tuple) -> tuple:
        """``args`` of :meth:`step_args` with packed integers (a tuple) as the step takes them: in
        device memory, from the last step's output where that holds them (``ints_ahead``), else
        copied from a host array (one launch)."""
        if args[2] is not None:
            return args
        from .kernels import dispatch

        def copy(ints):
            return dispatch.device_copy(mx.array(ints, dtype=mx.int32))

        ints = args[1]
        device = self.ints_ahead.device(ints, copy) if self.ints_ahead is not None else copy(ints)
        return (args[0], device) + tuple(args[2:])

    def __call__(self, inputs: mx.array, cache: List[Any]) -> Optional[mx.array]:
        """Logits, or None when this call must take the eager path."""
        prepared = self.step_args(cache, inputs, self.packed_ints, self.shared_slots)
        if prepared is None:
            return None
        host_args, reserved = prepared
        args = self.device_ints(host_args)
        self._check_kernels(args)
        self.transposed.evaluate()
        self.scalars.evaluate()
        with _context(self.joined, tracing=True, transposed=self.transposed, scalars=self.scalars):
            logits, new = self._step(*args)
        if self.ints_ahead is not None and args[2] is None:  # the next token's integers, computed by the step
            self.ints_ahead.remember(host_args[1], step_ints.group_sizes(args[4], args[6]), new.pop())
        for i, c in enumerate(cache):
            c.keys, c.values = new[2 * i], new[2 * i + 1]
            c.offset += 1
            if type(c) is RotatingKVCache:
                c._idx = reserved[i][0] + 1
        return logits


def decoder_for(model) -> CompiledDecoder:
    """The model's decoder, rebuilt when the model or a switch changed since it was built."""
    dec = model.__dict__.get("_decoder")
    if dec is None or not dec.current():
        # Drop the old trace first: it holds the old weights as constants.
        model.__dict__["_decoder"] = None
        dec = CompiledDecoder(model, previous=dec)
        model.__dict__["_decoder"] = dec
    return dec


def release(model) -> None:
    """Forget the model's decoder now (its trace and joined copies are otherwise released when the
    next decode call finds the model changed)."""
    model.__dict__["_decoder"] = None


def prepare(model) -> None:
    """At load, where the compiled step will run: build the decode state (join the projections)
    now rather than before the first token, and start building and self-checking the custom
    kernels the step will use, on a thread, while the weights load and the prompt is prefilled."""
    if not compile_enabled():
        return
    dec = decoder_for(model)
    from .kernels import dispatch

    if not dispatch.kernels_enabled():
        return
    # A lazy one-token prefill gives caches of the real dtypes and head shapes (nothing is
    # evaluated); the dry run of a step over them names the kernels.
    cache = model.make_cache()[: model.args.num_caches]  # without the KV-shared layers' placeholders
    model._eager(mx.zeros((1, 1), dtype=mx.int32), cache=cache)
    prepared = CompiledDecoder.step_args(cache, mx.zeros((1, 1), dtype=mx.int32), dec.packed_ints, dec.shared_slots)
    if prepared is not None:
        dispatch.check_ahead(dec.collect_kernels(dec.device_ints(prepared[0]))[0])
