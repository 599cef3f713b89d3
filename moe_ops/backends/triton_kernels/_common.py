"""What every Triton kernel family shares: launching, block sizes, and the index math.

Index math lives here once:

* ``group_bounds`` / ``tile_of_slot``: rows sorted by group (``offsets`` = cumulative
  ends) cut into BM-row tiles, each inside one group, found on the device from a
  static program id (no host sync).  The rows past ``offsets[-1]`` form one more
  group, the *tail* (group id ``G``), so a static grid of ``cdiv(M, BM) + G + 1``
  row slots covers every row whatever the group sizes; slots past the last tile exit.
* ``source_rows``: the operand row an expert-sorted row reads — itself, or the token
  of its pair (``pair_of_row[r] // K``) when the operand is gathered straight from
  token order.

Every row index is turned into int64 before it is multiplied by a stride: ``T*K*D``
exceeds 2^31 at real shapes.  Offsets and row indices are clamped, so no kernel reads
or writes out of bounds whatever the index values.

``INTERPRET`` is read when this module is imported, which is also when every kernel is
decorated (Triton picks interpreter or compiler at decoration time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.driver import driver as _driver
from triton.runtime.jit import compute_cache_key as _cache_key

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INSTRUMENTATION = knobs.compilation.instrumentation_mode  # what JITFunction.run passes (read once here)

# Activation kinds as kernel constants.
NO_ACT = tl.constexpr(0)
SWIGLU = tl.constexpr(1)
QUICK_GEGLU = tl.constexpr(2)
RELU2 = tl.constexpr(3)
SWIGLUOAI = tl.constexpr(4)  # quick_geglu's math on concatenated gate|up columns
GEGLU = tl.constexpr(5)  # tanh-approximated GELU of gate times up, concatenated
ACT_KIND = {None: 0, "swiglu": 1, "quick_geglu": 2, "relu2": 3, "swigluoai": 4, "geglu": 5}


def _interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter holds a scalar as a 1-element array and turns it into a Python
    int (``range(n)``) with ``int(array)``, which NumPy >= 2.4 refuses; go through ``.item()``."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "moe_ops_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.moe_ops_patched = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_scalar_index()


# The plain Python body of every kernel family's op, by op name: the ``triton`` backend calls these
# inside the opaque ``moe::`` ops (already past the dispatcher), so they only ever run eagerly on
# real tensors.  They are not registered as custom ops of their own: a second custom-op layer cost
# 50-100 us of host time per call (measured on H200 under torch.profiler), which an expert-parallel
# step with a host sync pays in full, and nothing used it.
BODIES: dict = {}


def kernel_body(name: str):
    """Record the decorated function in :data:`BODIES` as the body of op ``name``; returns it unchanged."""

    def record(fn):
        BODIES[name] = fn
        return fn

    return record


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``: in the interpreter without the compiler-only options, else
    through :func:`_launch_compiled` (the compiled kernel's own launcher) once it is compiled."""
    if INTERPRET:
        meta.pop("num_warps", None)
        meta.pop("num_stages", None)
        kernel[grid](*args, **meta)
    elif not _launch_compiled(kernel, grid, args, meta):
        kernel[grid](*args, **meta)


def _launch_compiled(kernel, grid, args, meta) -> bool:
    """Launch the already compiled variant of ``kernel`` for these arguments straight through its
    launcher, skipping the rest of ``JITFunction.run`` (environment reads, hooks, checks: about 10 us
    of host time per launch on the H200 host, against 7 for the launch itself).  The variant is
    found exactly as Triton finds it (its binder computes the specialization, its key function the
    cache key), so the same machine code runs.  Returns False (the caller takes the ordinary path,
    which compiles) when it is not compiled yet, a launch hook is set, or this Triton lacks the API.
    """
    try:
        if knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls:
            return False  # a profiler's hooks: they need the launch metadata
        device = _driver.active.get_current_device()
        kernel_cache, key_cache, _, _, binder = kernel.device_caches[device]
        # The options JITFunction.run adds, in its order (the cache key is their string).
        bound, specialization, options = binder(*args, **meta, debug=kernel.debug or knobs.runtime.debug,
                                                instrumentation_mode=_INSTRUMENTATION)
        compiled = kernel_cache.get(_cache_key(key_cache, specialization, options))
    except (AttributeError, TypeError, KeyError):  # another Triton: its own path
        return False
    if compiled is None or hasattr(compiled, "result"):  # not compiled yet, or still compiling
        return False
    grid = tuple(grid) + (1, 1)
    compiled.run(grid[0], grid[1], grid[2], _driver.active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *bound.values())
    return True


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def g_pad(groups: int) -> int:
    """Vector width holding the groups plus the tail group."""
    return pow2(groups + 1)


def row_slots(rows, groups: int, block_m: int):
    """Static upper bound on the number of BM-row tiles of ``groups`` groups plus the tail."""
    return triton.cdiv(rows, block_m) + groups + 1


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's TF32 setting (IEEE by default); 16-bit inputs ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# ---- block sizes ------------------------------------------------------------------------
#
# Configurations are picked by shape heuristics, not triton.autotune: autotuning benchmarks
# on the host the first time a shape is seen, which cannot happen inside CUDA-graph
# capture, makes first calls slow and timing-dependent, and hides a launch choice from
# torch.compile.  MOE_TRITON_CONFIG overrides a family for tuning runs, e.g.
# ``MOE_TRITON_CONFIG="gemm=128x256x64w8s3,wgrad=128x128x64w8s3"`` (BMxBNxBK, warps, stages).


@dataclass(frozen=True)
class Blocks:
    m: int
    n: int
    k: int
    warps: int = 4
    stages: int = 3

    def meta(self) -> dict:
        return {"num_warps": self.warps, "num_stages": self.stages}


TINY = Blocks(16, 16, 16, 1, 1)  # the interpreter: every tile shape still >= 16 for tl.dot


def _override(family: str):
    spec = os.environ.get("MOE_TRITON_CONFIG", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name == family:
            mnk, _, rest = value.partition("w")
            warps, _, stages = rest.partition("s")
            m, n, k = (int(v) for v in mnk.split("x"))
            return Blocks(m, n, k, int(warps), int(stages))
    return None


def gemm_blocks(rows: int, groups: int, n: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the grouped GEMM (Hopper, from the candidates BM 64/128, BN 128/256, BK 64, warps 4/8, stages 3/4).

    ``n`` is the output width.  Small groups take BM 64 so fewer rows are wasted.
    """
    if INTERPRET:
        return TINY
    chosen = _override("gemm")
    if chosen:
        return chosen
    if dtype.itemsize == 4:  # float32: IEEE FMA (or TF32) math, not the fast path; tiles that do not spill
        return Blocks(64, 128, 32, 8, 3)
    small_groups = rows < 128 * max(groups, 1)
    bm = 64 if small_groups else 128
    if n >= 2048 and not small_groups:
        return Blocks(128, 256, 64, 8, 3)
    return Blocks(bm, 128, 64, 8 if bm == 128 else 4, 4)


def wgrad_blocks(dtype: torch.dtype) -> Blocks:
    """``m`` x ``n``: the output tile of one group; ``k``: rows reduced per step."""
    if INTERPRET:
        return TINY
    chosen = _override("wgrad")
    if chosen:
        return chosen
    return Blocks(128, 128, 32 if dtype.itemsize == 4 else 64, 8, 3)


def rows_blocks(width: int, max_cols: int = 256) -> Blocks:
    """Memory-bound row kernels: ``m`` rows x ``n`` columns per program."""
    if INTERPRET:
        return Blocks(8, 16, 16)
    return Blocks(16, min(pow2(width), max_cols), 0, 4)


# ---- shared device helpers -----------------------------------------------------------------

_UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` (float32 accumulator).  The interpreter would multiply bfloat16 tiles as
    their raw uint16 bits, so there the tiles are widened to float32 first."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


# ---- shared index math --------------------------------------------------------------------


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def group_bounds(offsets_ptr, G, M, G_PAD: tl.constexpr):
    """Row ranges ``[starts, ends)`` of the G groups, the tail (lane G: rows past the last
    offset) and empty lanes past it, as ``[G_PAD]`` int32 vectors.  Offsets are clamped into
    ``[0, M]`` and made non-decreasing, so any offsets give disjoint in-bounds ranges."""
    lane = tl.arange(0, G_PAD)
    ends = tl.load(offsets_ptr + lane, mask=lane < G, other=0)
    ends = tl.where(lane < G, ends, M)
    prev = tl.load(offsets_ptr + lane - 1, mask=(lane >= 1) & (lane <= G), other=0)
    prev = tl.where(lane <= G, prev, M)
    ends = tl.associative_scan(tl.minimum(tl.maximum(ends, 0), M), 0, _max)
    starts = tl.associative_scan(tl.minimum(tl.maximum(prev, 0), M), 0, _max)
    return starts, ends


@triton.jit
def pick(vector, lane, index):
    """``vector[index]`` for a scalar index (a masked sum: registers cannot be indexed)."""
    return tl.sum(tl.where(lane == index, vector, 0), 0)


@triton.jit
def group_rows(offsets_ptr, G, M, group, G_PAD: tl.constexpr):
    """``start, end`` rows of one group (``group == G``: the tail)."""
    starts, ends = group_bounds(offsets_ptr, G, M, G_PAD)
    lane = tl.arange(0, G_PAD)
    return pick(starts, lane, group), pick(ends, lane, group)


@triton.jit
def tile_of_slot(offsets_ptr, G, M, slot, BM: tl.constexpr, G_PAD: tl.constexpr):
    """The BM-row tile of static row slot ``slot``: ``(group, row_start, row_end)``.

    Groups' tiles are numbered in group order; ``group == G`` is a tile of the tail
    (rows past ``offsets[-1]``) and ``group > G`` means the slot is past every tile.
    Rows ``row_start .. row_start+BM-1`` below ``row_end`` belong to the tile."""
    starts, ends = group_bounds(offsets_ptr, G, M, G_PAD)
    lane = tl.arange(0, G_PAD)
    tiles = (ends - starts + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    group = tl.sum((tile_end <= slot).to(tl.int32), 0)
    first_tile = pick(tile_end - tiles, lane, group)
    row_start = pick(starts, lane, group) + (slot - first_tile) * BM
    return group, row_start, pick(ends, lane, group)


@triton.jit
def source_rows(rows, mask, pair_of_row_ptr, topk, n_src, GATHER: tl.constexpr):
    """Operand row (int64) read by each expert-sorted row, and whether it may be read.

    ``GATHER``: the token of the row's pair, ``pair_of_row[r] // topk`` (rows of ``x`` or
    ``grad_y`` in token order, read in place: no permuted copy); else the row itself."""
    if GATHER:
        pair = tl.load(pair_of_row_ptr + rows, mask=mask, other=0).to(tl.int64)
        src = pair // topk
        ok = mask & (src >= 0) & (src < n_src)
        return tl.where(ok, src, 0), ok
    else:
        return rows.to(tl.int64), mask


@triton.jit
def valid_limit(offsets_ptr, G, n_rows):
    """Rows below this are valid pairs' rows: ``min(max(offsets[-1], 0), n_rows)``."""
    last = tl.load(offsets_ptr + G - 1)
    return tl.minimum(tl.maximum(last, 0), n_rows).to(tl.int64)
