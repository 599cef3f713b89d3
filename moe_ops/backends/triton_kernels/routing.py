"""route: a stable counting sort of the T*K (token, slot) pairs by local expert, on the device.

Pair ``i = t*K + k`` gets key ``e`` (its local expert) or ``E`` (masked token, -1,
non-local or out-of-range expert: sorted past the last group).  Three launches, no host
sync, no atomics (so the order is deterministic):

1. ``_histogram_kernel``: per block of BLOCK pairs, the count of each key -> ``hist[block, bin]``;
2. ``_scan_kernel`` (one program): key totals -> ``tokens_per_expert`` and ``offsets``; then
   for every (block, key) the row where the block's first pair of that key goes, minus that
   pair's position among the block's pairs sorted by key (``adjust``);
3. ``_scatter_kernel``: each block sorts its (key, index) pairs in registers; the pair at
   sorted position j goes to row ``adjust[block, key] + j``, which is stable: pairs of one key
   keep pair order within a block and blocks come in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.backends.triton_kernels import _common as C


@triton.jit
def _pair_keys(indices_ptr, token_mask_ptr, pid, n_pairs, K, expert_start, E, BLOCK: tl.constexpr):
    """Keys of the block's pairs: local expert, E for pairs sorted past the last group,
    E + 1 for lanes past the last pair."""
    pairs = pid * BLOCK + tl.arange(0, BLOCK)
    lane_ok = pairs < n_pairs
    expert = tl.load(indices_ptr + pairs, mask=lane_ok, other=-1).to(tl.int64) - expert_start
    keep = tl.load(token_mask_ptr + pairs // K, mask=lane_ok, other=0) != 0
    local = keep & (expert >= 0) & (expert < E)
    key = tl.where(local, expert, E).to(tl.int32)
    return tl.where(lane_ok, key, E + 1), lane_ok


@triton.jit
def _histogram_kernel(indices_ptr, token_mask_ptr, hist_ptr, n_pairs, K, expert_start, E,
                      BLOCK: tl.constexpr, BINS: tl.constexpr):
    pid = tl.program_id(0)
    key, _ = _pair_keys(indices_ptr, token_mask_ptr, pid, n_pairs, K, expert_start, E, BLOCK)
    counts = tl.histogram(key, BINS)
    tl.store(hist_ptr + pid.to(tl.int64) * BINS + tl.arange(0, BINS), counts)


@triton.jit
def _scan_kernel(hist_ptr, adjust_ptr, tokens_per_expert_ptr, offsets_ptr, n_blocks, E,
                 BINS: tl.constexpr, CHUNK: tl.constexpr):
    bins = tl.arange(0, BINS)
    totals = tl.zeros((BINS,), dtype=tl.int32)
    for b0 in range(0, n_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        tile = tl.load(hist_ptr + blocks.to(tl.int64)[:, None] * BINS + bins[None, :],
                       mask=(blocks < n_blocks)[:, None], other=0)
        totals += tl.sum(tile, 0)
    ends = tl.cumsum(totals, 0)
    tl.store(tokens_per_expert_ptr + bins, totals.to(tl.int64), mask=bins < E)
    tl.store(offsets_ptr + bins, ends, mask=bins < E)
    running = ends - totals  # first row of each key, then advanced block by block
    for b0 in range(0, n_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        ptrs = blocks.to(tl.int64)[:, None] * BINS + bins[None, :]
        block_ok = (blocks < n_blocks)[:, None]
        tile = tl.load(hist_ptr + ptrs, mask=block_ok, other=0)
        first_row = running[None, :] + tl.cumsum(tile, 0) - tile   # of this block's pairs of each key
        sorted_pos = tl.cumsum(tile, 1) - tile                     # of those pairs in the block's sort
        tl.store(adjust_ptr + ptrs, first_row - sorted_pos, mask=block_ok)
        running += tl.sum(tile, 0)


@triton.jit
def _scatter_kernel(indices_ptr, token_mask_ptr, adjust_ptr, pair_of_row_ptr, row_of_pair_ptr,
                    n_pairs, K, expert_start, E, BLOCK: tl.constexpr, BINS: tl.constexpr):
    pid = tl.program_id(0)
    key, _ = _pair_keys(indices_ptr, token_mask_ptr, pid, n_pairs, K, expert_start, E, BLOCK)
    order = tl.sort(key * BLOCK + tl.arange(0, BLOCK))  # by key, then by position: stable
    sorted_key = order // BLOCK
    pair = pid.to(tl.int64) * BLOCK + (order % BLOCK)
    is_pair = sorted_key <= E
    adjust = tl.load(adjust_ptr + pid.to(tl.int64) * BINS + sorted_key, mask=is_pair, other=0)
    row = (adjust + tl.arange(0, BLOCK)).to(tl.int64)
    row_ok = is_pair & (row >= 0) & (row < n_pairs)
    tl.store(pair_of_row_ptr + tl.where(row_ok, row, 0), pair, mask=row_ok)
    tl.store(row_of_pair_ptr + tl.where(row_ok, pair, 0), row, mask=row_ok)


def _route_blocks(bins: int) -> tuple[int, int]:
    """BLOCK: pairs per histogram/sort program; CHUNK: blocks per step of the one-program scan
    (a CHUNK x bins tile of 2K int32: 16 per thread, with room for the two scans)."""
    return (32, 4) if C.INTERPRET else (1024, max(1, 2048 // bins))


@C.kernel_body("route")
def route(
    indices: Tensor, token_mask: Tensor, expert_start: int, num_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, K = indices.shape
    n_pairs = T * K
    E = num_experts
    bins = C.pow2(E + 2)
    block, chunk = _route_blocks(bins)
    n_blocks = triton.cdiv(n_pairs, block)
    indices = indices.contiguous()
    token_mask = token_mask.contiguous()
    device = indices.device
    hist = torch.empty(n_blocks, bins, dtype=torch.int32, device=device)
    adjust = torch.empty(n_blocks, bins, dtype=torch.int32, device=device)
    pair_of_row = torch.empty(n_pairs, dtype=torch.int64, device=device)
    row_of_pair = torch.empty(T, K, dtype=torch.int64, device=device)
    tokens_per_expert = torch.empty(E, dtype=torch.int64, device=device)
    offsets = torch.empty(E, dtype=torch.int32, device=device)
    common = dict(BLOCK=block, BINS=bins, num_warps=4)
    C.launch(_histogram_kernel, (n_blocks,), indices, token_mask, hist, n_pairs, K, expert_start, E, **common)
    C.launch(_scan_kernel, (1,), hist, adjust, tokens_per_expert, offsets, n_blocks, E,
             BINS=bins, CHUNK=chunk, num_warps=4)
    C.launch(_scatter_kernel, (n_blocks,), indices, token_mask, adjust, pair_of_row, row_of_pair,
             n_pairs, K, expert_start, E, **common)
    return pair_of_row, row_of_pair, tokens_per_expert, offsets
