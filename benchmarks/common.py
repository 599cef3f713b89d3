"""Shapes, routing, FLOP/byte counts, timing and memory helpers shared by the benchmarks.

Timing follows /work/.library/device/METHOD.md: warm up, then time every repetition
with CUDA events (``time.perf_counter`` around a synchronised call on CPU) and keep the
median; repetitions are chosen from a time budget so big and small cases both finish.
"""

from __future__ import annotations

import datetime
import gc
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

ZIPF_EXPONENT = 1.2  # expert popularity ~ 1 / rank**1.2 for the skewed routing


@dataclass(frozen=True)
class Shape:
    name: str
    E: int  # experts on this device
    K: int  # experts per token
    D: int  # model dim
    I: int  # expert inner dim
    T: int  # tokens
    activation: str = "swiglu"
    bias: bool = False

    @property
    def gated(self) -> bool:
        return self.activation != "relu2"

    @property
    def C(self) -> int:
        """Width of the first GEMM's output."""
        return 2 * self.I if self.gated else self.I

    @property
    def R(self) -> int:
        """Routed rows (token, expert pairs)."""
        return self.T * self.K

    def config(self, dtype=torch.bfloat16):
        from moe_modules import MoEConfig

        return MoEConfig(n_routed_experts=self.E, n_activated_experts=self.K, dim=self.D, moe_inter_dim=self.I,
                         expert_activation=self.activation, expert_bias=self.bias, dtype=dtype)

    def as_dict(self) -> dict:
        return asdict(self) | {"R": self.R, "C": self.C}


SHAPES = {
    "qwen3": Shape("qwen3", E=128, K=8, D=2048, I=768, T=16384),
    # One rank of DeepSeek-V3 under EP8: 32 local experts, 65536 routed rows.
    "dsv3_ep8_rank": Shape("dsv3_ep8_rank", E=32, K=8, D=7168, I=2048, T=8192),
    "mixtral": Shape("mixtral", E=8, K=2, D=4096, I=14336, T=8192),
    "gptoss20b": Shape("gptoss20b", E=32, K=4, D=2880, I=2880, T=8192, activation="quick_geglu", bias=True),
}

# Same four families, small enough for a CPU (the --tiny CI run); widths keep 16-byte rows.
TINY_SHAPES = {
    "qwen3": Shape("qwen3", E=8, K=2, D=64, I=32, T=64),
    "dsv3_ep8_rank": Shape("dsv3_ep8_rank", E=4, K=2, D=96, I=32, T=48),
    "mixtral": Shape("mixtral", E=4, K=2, D=64, I=96, T=32),
    "gptoss20b": Shape("gptoss20b", E=4, K=2, D=72, I=40, T=40, activation="quick_geglu", bias=True),
}

ROUTINGS = ("uniform", "zipf")


# ----------------------------------------------------------------------------- counts
def flops(shape: Shape) -> dict:
    """Matmul FLOPs: forward = 2 R D C + 2 R I D; forward+backward = 3x forward (dgrad + wgrad)."""
    fwd = 2 * shape.R * shape.D * shape.C + 2 * shape.R * shape.I * shape.D
    return {"fwd": fwd, "fwd_bwd": 3 * fwd}


def min_bytes(shape: Shape, elem: int = 2) -> dict:
    """Fewest bytes through device memory, each tensor read or written once (routing tensors ignored).

    forward: read x, W1, W2 (and biases), write y.
    forward+backward: also read grad_y, write dx, dW1, dW2 (and bias grads).
    """
    weights = shape.E * (shape.D * shape.C + shape.I * shape.D)
    if shape.bias:
        weights += shape.E * (shape.C + shape.D)
    tokens = shape.T * shape.D
    return {"fwd": elem * (2 * tokens + weights), "fwd_bwd": elem * (4 * tokens + 2 * weights)}


# ----------------------------------------------------------------------------- routing
def make_routing(shape: Shape, kind: str, device, seed: int = 0):
    """``indices [T, K]`` int64 (K distinct experts per token), ``weights [T, K]`` float32
    (softmax of random logits), ``token_mask [T]`` all True.

    uniform: every K-subset equally likely.  zipf: experts (in a random order) have
    popularity ~ 1/rank**1.2 and each token draws K distinct experts without replacement
    (Gumbel top-k), so the popular experts saturate at T tokens.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, E, K = shape.T, shape.E, shape.K
    if kind == "uniform":
        scores = torch.rand(T, E, generator=g)
    elif kind == "zipf":
        rank = torch.randperm(E, generator=g).double() + 1
        log_p = -ZIPF_EXPONENT * torch.log(rank)
        u = torch.rand(T, E, generator=g, dtype=torch.float64).clamp_min(1e-12)
        scores = log_p - torch.log(-torch.log(u))  # + Gumbel noise
    else:
        raise ValueError(f"routing: expected one of {ROUTINGS}, got {kind!r}")
    indices = scores.topk(K, dim=1).indices
    weights = torch.randn(T, K, generator=g).softmax(dim=1)
    token_mask = torch.ones(T, dtype=torch.bool)
    return indices.to(device), weights.to(device), token_mask.to(device)


def expert_counts(indices: torch.Tensor, E: int) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1), minlength=E)


# ----------------------------------------------------------------------------- timing
def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def _time_once_ms(fn: Callable, device) -> float:
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable, device, *, reps: Optional[int] = None, warmup: int = 2, budget_s: float = 0.5,
            min_reps: int = 10, max_reps: int = 100) -> dict:
    """Median milliseconds of ``fn()`` over ``reps`` repetitions after ``warmup`` calls.

    Without ``reps`` the count comes from the last warm-up's time: about ``budget_s`` seconds
    of repetitions, within [min_reps, max_reps].  On CUDA each repetition is bracketed by its
    own pair of events, recorded back to back without host synchronisation in between.
    """
    last = float("nan")
    for _ in range(max(warmup, 1)):
        last = _time_once_ms(fn, device)
    if reps is None:
        reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(last, 1e-3))))
    if is_cuda(device):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in events]
    else:
        samples = [_time_once_ms(fn, device) for _ in range(reps)]
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p10_ms": samples[int(0.1 * (len(samples) - 1))],
        "p90_ms": samples[int(0.9 * (len(samples) - 1))],
        "reps": reps,
    }


def peak_extra_bytes(fn: Callable, device) -> Optional[int]:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it (CUDA only)."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - base


def saved_bytes(fn: Callable, held: list) -> tuple[int, list]:
    """Bytes that ``fn()`` saves for backward (``torch.autograd.graph.saved_tensors_hooks``): distinct
    storages (a tensor saved by two nodes is held once), leaving out those of ``held`` and of every
    leaf that requires grad, or view of one (inputs and parameters: the caller holds them anyway).  Also returns the
    saved ``(bytes, shape, dtype)``, largest first."""
    from torch.autograd.graph import saved_tensors_hooks

    def key(t):
        return t.untyped_storage().data_ptr()

    excluded = {key(t) for t in held}
    seen = {}

    def pack(t):
        base = t if t._base is None else t._base  # a view of a parameter is the parameter's storage
        if key(t) not in excluded and not (base.is_leaf and base.requires_grad):
            seen[key(t)] = (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype)
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(nbytes for nbytes, _, _ in seen.values()), sorted(seen.values(), reverse=True, key=lambda v: v[0])


def free_memory() -> None:
    """Return cached CUDA blocks between cases (gc first: reference cycles may hold tensors)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (nan if either holds a NaN)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def tflops(flop: int, ms: Optional[float]) -> Optional[float]:
    if ms is None or not math.isfinite(ms) or ms <= 0:
        return None
    return flop / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- environment
def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "unknown")
    except Exception as e:  # missing or broken install: say which
        return f"n/a ({type(e).__name__})"


def environment(device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformer_engine": _version("transformer_engine"),
        "device": str(device),
    }
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        info |= {
            "card": props.name,
            "capability": "sm%d%d" % torch.cuda.get_device_capability(device),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
        }
    else:
        info |= {"card": f"CPU ({platform.processor() or platform.machine()})", "capability": None}
    return info
