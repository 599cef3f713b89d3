"""Which output rows torch._grouped_mm leaves unwritten on this card (the memory is poisoned with NaN first).

    python benchmarks/check_grouped_mm_tails.py

Decides what the torch backend must zero itself: rows past offsets[-1] of ``[M,K] x [G,K,N]``,
and the slices of empty groups of the weight-gradient form ``[K,M] x [M,N] -> [G,K,N]``.
"""

import torch

torch.manual_seed(0)
dev, bf16 = "cuda", torch.bfloat16
E, M, K, N = 8, 1024, 256, 512
counts = torch.tensor([0, 200, 0, 300, 100, 0, 200, 0])
offs = counts.cumsum(0).to(torch.int32).to(dev)
end = int(counts.sum())
a, b, g = (torch.randn(*s, device=dev, dtype=bf16) for s in ((M, K), (E, K, N), (M, N)))


def poisoned_call(shape, fn):
    for _ in range(3):  # the caching allocator hands the freed block back to the next request of that size
        torch.full(shape, float("nan"), device=dev, dtype=bf16)
    return fn()


out = poisoned_call((M, N), lambda: torch._grouped_mm(a, b, offs=offs))
print(f"2d x 3d: rows past offsets[-1] NaN (unwritten): {bool(out[end:].isnan().any())}; "
      f"valid rows finite: {bool(out[:end].isfinite().all())}")
w = poisoned_call((E, K, N), lambda: torch._grouped_mm(a.t(), g, offs=offs))
empty = [e for e in range(E) if counts[e] == 0]
print(f"wgrad: empty groups {empty} NaN (unwritten): {[bool(w[e].isnan().any()) for e in empty]}, "
      f"exactly zero: {[bool((w[e] == 0).all()) for e in empty]}")
ref = torch.stack([a[s:t].float().t() @ g[s:t].float() for s, t in zip([0, *offs[:-1].tolist()], offs.tolist())])
print(f"wgrad non-empty groups rel err vs fp32 loop: {float((w.float() - ref).norm() / ref.norm()):.2e}")
