"""Shared fixtures: routing cases, op inputs, dtypes and layouts, a clean registry per test.

Tests run on CPU by default; ``MOE_OPS_TEST_DEVICE=cuda`` runs the same op and
module tests on a GPU (with whichever backend the registry picks there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

import pytest
import torch

import reference
from moe_ops import registry

DEVICE = torch.device(os.environ.get("MOE_OPS_TEST_DEVICE", "cpu"))
D_MODEL, D_OUT = 8, 16  # row widths (multiples of 8: bf16 rows stay 16-byte aligned for the torch backend)


@pytest.fixture(autouse=True)
def _seed_and_clean_registry():
    """Fixed random inputs; no forced backend may leak out of a test."""
    torch.manual_seed(0)
    yield
    for op in (None, *registry.OPS):
        registry.set_backend(None, op)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


# ---- layouts ------------------------------------------------------------------------------


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-row-major layout: column-major when the last two dims are both > 1
    (like a transposed weight), else every other element of a twice-as-long buffer (like a slice)."""
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        buf = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        buf[..., ::2] = t
        out = buf[..., ::2]
    assert not out.is_contiguous() or t.numel() <= 1
    return out.detach()


@pytest.fixture(params=[True, False], ids=["contiguous", "strided"])
def contiguous(request) -> bool:
    return request.param


def layout(t: Optional[torch.Tensor], contiguous: bool) -> Optional[torch.Tensor]:
    return t if t is None or contiguous else noncontiguous(t)


@pytest.fixture
def relayout() -> Callable:
    """``relayout(t, contiguous)``: ``t`` itself, or the same values in a non-contiguous layout."""
    return layout


# ---- routing cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Inputs of ``moe::route``: local experts are ``expert_start .. expert_start + num_experts - 1``."""

    indices: torch.Tensor  # [T, K]
    token_mask: torch.Tensor  # [T] bool
    expert_start: int
    num_experts: int

    @property
    def T(self) -> int:
        return self.indices.shape[0]

    @property
    def K(self) -> int:
        return self.indices.shape[1]

    def args(self) -> tuple:
        return self.indices, self.token_mask, self.expert_start, self.num_experts

    def ref(self) -> reference.RouteRef:
        return reference.route(*self.args())

    def laid_out(self, contiguous: bool) -> "Routing":
        return replace(self, indices=layout(self.indices, contiguous), token_mask=layout(self.token_mask, contiguous))


def _routing(indices, mask=None, expert_start=0, num_experts=None, dtype=torch.int64) -> Routing:
    indices = torch.tensor(indices, dtype=dtype)
    mask = torch.ones(indices.shape[0], dtype=torch.bool) if mask is None else torch.tensor(mask)
    num_experts = num_experts if num_experts is not None else int(indices.max()) + 1
    return Routing(indices.to(DEVICE), mask.to(DEVICE), expert_start, num_experts)


def _random_routing(T, K, E, seed=1) -> Routing:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    mask = torch.rand(T, generator=gen) > 0.2
    return Routing(indices.to(DEVICE), mask.to(DEVICE), 0, E)


MIXED = dict(  # expert 3 gets no token; a masked token, a -1 slot, a token sent twice to one expert
    indices=[[0, 2], [2, -1], [1, 0], [0, 2], [2, 2], [1, -1]],
    mask=[True, True, False, True, True, True],
    num_experts=4,
)

ROUTINGS: dict[str, Callable[[], Routing]] = {
    "mixed": lambda: _routing(**MIXED),
    "mixed_int32": lambda: _routing(**MIXED, dtype=torch.int32),
    "empty_first_and_last_expert": lambda: _routing([[1, 3], [3, 1], [1, 3], [3, 1]], num_experts=5),
    "all_masked": lambda: _routing([[0, 1], [2, 0], [1, 2]], mask=[False] * 3, num_experts=3),
    "all_unrouted": lambda: _routing([[-1, -1], [-1, -1]], num_experts=2),
    "T1": lambda: _routing([[2, 0]], num_experts=3),
    "K1": lambda: _routing([[2], [0], [2], [1], [0]], num_experts=3),
    "E1": lambda: _routing([[0], [-1], [0]], num_experts=1),
    "out_of_range": lambda: _routing([[3, 0], [-2, 1], [7, -5], [2, 1]], num_experts=3),
    # global experts 0..7, this rank owns 3, 4, 5: the others are non-local pairs
    "local_range": lambda: _routing([[3, 0], [7, 5], [4, 3], [1, 2], [5, 6], [4, -1]],
                                    mask=[True, True, True, True, False, True], expert_start=3, num_experts=3),
    "random": lambda: _random_routing(T=9, K=3, E=5),
}


@pytest.fixture(params=sorted(ROUTINGS))
def routing(request) -> Routing:
    return ROUTINGS[request.param]()


# After route, an op sees only row_of_pair and offsets: these cases span their distinct patterns
# (the expensive opcheck/gradcheck runs use them; index dtypes and -1 / non-local / out-of-range
# pairs all reduce to "a row past the last group", which "mixed" has).
GROUP_PATTERNS = ["mixed", "empty_first_and_last_expert", "all_masked", "T1", "K1", "E1"]


@pytest.fixture(params=GROUP_PATTERNS)
def group_pattern(request) -> Routing:
    return ROUTINGS[request.param]()


# ---- dtypes -----------------------------------------------------------------------------------

# (data dtype, routing-weight / probs dtype)
DTYPE_PAIRS = {
    "f64": (torch.float64, torch.float64),
    "f32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_f32probs": (torch.bfloat16, torch.float32),
}


@pytest.fixture(params=sorted(DTYPE_PAIRS))
def dtypes(request) -> tuple[torch.dtype, torch.dtype]:
    return DTYPE_PAIRS[request.param]


# ---- op inputs ----------------------------------------------------------------------------------


class OpArgs:
    """Builds the positional arguments of ``torch.ops.moe.<op>`` for one routing case.

    Row-order inputs come from the *reference* routing, so each op is tested on its own.
    ``poison_tail`` fills rows past ``offsets[-1]`` (rows of no group) with NaN: ops must ignore them.
    """

    def __init__(self, routing: Optional[Routing], dtype, weight_dtype, *, contiguous=True,
                 requires_grad=False, poison_tail=False, widths=(D_MODEL, D_OUT)):
        self.dtype, self.weight_dtype = dtype, weight_dtype
        self.d_model, self.d_out = widths
        self.contiguous, self.requires_grad, self.poison_tail = contiguous, requires_grad, poison_tail
        if routing is not None:
            ref = routing.ref()
            self.T, self.K, self.E = routing.T, routing.K, routing.num_experts
            self.rows = self.T * self.K
            self.valid_rows = ref.offsets[-1]
            self.row_of_pair = layout(ref.row_of_pair(self.T, self.K).to(DEVICE), contiguous)
            self.offsets = torch.tensor(ref.offsets, dtype=torch.int32, device=DEVICE)

    def float(self, *shape, dtype=None, scale=1.0, tail=False, positive=False) -> torch.Tensor:
        """Random values drawn in float64 then cast (the same numbers whatever the dtype)."""
        t = torch.rand(shape, dtype=torch.float64) * 0.9 + 0.1 if positive else torch.randn(shape, dtype=torch.float64)
        t = t * scale
        if tail and self.poison_tail:
            t[self.valid_rows:] = float("nan")
        t = layout(t.to(dtype or self.dtype).to(DEVICE), self.contiguous)
        return t.requires_grad_(self.requires_grad)

    def weights(self) -> torch.Tensor:
        return self.float(self.T, self.K, dtype=self.weight_dtype, positive=True)

    def probs(self, rows: int, shape: str) -> Optional[torch.Tensor]:
        """``shape``: "none", "N" ([N]) or "N1" ([N, 1])."""
        if shape == "none":
            return None
        p = self.float(rows, dtype=self.weight_dtype, positive=True)
        return p if shape == "N" else p.detach().unsqueeze(1).requires_grad_(self.requires_grad)

    # One method per op, returning the op's positional arguments.

    def route(self, routing: Routing) -> tuple:
        return routing.laid_out(self.contiguous).args()

    # ``rows="valid"``: the expert-order side holds only the valid rows (offsets[-1] of them), as
    # expert parallelism sends them; "half": half of those (the pairs past them are dropped);
    # "all": T*K rows.
    def _row_count(self, rows: str) -> int:
        return {"all": self.rows, "valid": self.valid_rows, "half": self.valid_rows // 2}[rows]

    def gather(self, weighted=False, rows="all"):
        x = self.float(self.T, self.d_model)
        args = (x, self.row_of_pair, self.offsets, self.weights() if weighted else None)
        return args if rows == "all" else (*args, self._row_count(rows))

    def combine(self, weighted=False, rows="all"):
        expert_rows = self.float(self._row_count(rows), self.d_model, tail=rows == "all")
        return expert_rows, self.row_of_pair, self.offsets, self.weights() if weighted else None

    def pair_dot(self, rows="all"):
        expert_rows = self.float(self._row_count(rows), self.d_model, tail=rows == "all")
        return self.float(self.T, self.d_model), expert_rows, self.row_of_pair, self.offsets

    def grouped_mm(self):
        return self.float(self.rows, self.d_model, tail=True), self.float(self.E, self.d_model, self.d_out), self.offsets

    def grouped_mm_wgrad(self):
        return self.float(self.rows, self.d_model, tail=True), self.float(self.rows, self.d_out, tail=True), self.offsets

    def add_expert_bias(self, probs="none"):
        return self.float(self.rows, self.d_out), self.float(self.E, self.d_out), self.offsets, self.probs(self.rows, probs)

    def expert_bias_backward(self, probs="none"):
        grad = self.float(self.rows, self.d_out, tail=True)
        return grad, self.float(self.E, self.d_out), self.offsets, self.probs(self.rows, probs)

    def activation(self, rows, kind, limit=7.0, probs="none"):
        # scale 4: a few quick_geglu inputs pass the clamp limit 7
        h = self.float(rows, self.d_model if kind == "relu2" else 2 * self.d_model, scale=4.0)
        return h, self.probs(rows, probs), kind, 1.702, limit, 1.0

    def activation_backward(self, rows, kind, limit=7.0, probs="none"):
        h, p, *params = self.activation(rows, kind, limit, probs)
        grad = self.float(rows, self.d_model)
        return (grad, h, p, *params)


@pytest.fixture
def op_args() -> type[OpArgs]:
    return OpArgs


# Op variants: (op, routed?, keyword arguments of the OpArgs method). Activation ops take a row
# count instead of a routing.
ACTIVATION_VARIANTS = [
    dict(kind=kind, limit=limit, probs=probs)
    for kind, limit in (("swiglu", 7.0), ("quick_geglu", 7.0), ("quick_geglu", None), ("swigluoai", 7.0),
                        ("geglu", None), ("relu2", 7.0))
    for probs in ("none", "N", "N1")
]
ROUTED_VARIANTS = [
    ("gather", dict(weighted=False)),
    ("gather", dict(weighted=True)),
    ("combine", dict(weighted=False)),
    ("combine", dict(weighted=True)),
    ("pair_dot", {}),
    # Only the valid rows on the expert-order side (expert parallelism's receive buffers).
    ("gather", dict(weighted=True, rows="valid")),
    ("combine", dict(weighted=True, rows="valid")),
    ("pair_dot", dict(rows="valid")),
    ("gather", dict(weighted=False, rows="half")),
    ("combine", dict(weighted=False, rows="half")),
    ("grouped_mm", {}),
    ("grouped_mm_wgrad", {}),
    *[(op, dict(probs=p)) for op in ("add_expert_bias", "expert_bias_backward") for p in ("none", "N", "N1")],
]


@pytest.fixture
def covered_ops() -> set:
    """Every op the variant lists exercise (a new op must be added to them)."""
    return {"route", "activation", "activation_backward"} | {op for op, _ in ROUTED_VARIANTS}


@pytest.fixture
def mixed_routing() -> Routing:
    return ROUTINGS["mixed"]()


def variant_id(value) -> str:
    if isinstance(value, dict):
        return "-".join(f"{k}={v}" for k, v in value.items()) or "plain"
    return str(value)


def pytest_generate_tests(metafunc):
    """Tests asking for ``routed_variant`` or ``activation_variant`` run over every variant."""
    if "routed_variant" in metafunc.fixturenames:
        metafunc.parametrize("routed_variant", ROUTED_VARIANTS,
                             ids=[f"{op}[{variant_id(v)}]" for op, v in ROUTED_VARIANTS])
    if "activation_variant" in metafunc.fixturenames:
        metafunc.parametrize("activation_variant", ACTIVATION_VARIANTS, ids=map(variant_id, ACTIVATION_VARIANTS))
