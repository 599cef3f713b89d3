"""A CPU stand-in for the two things ``moe_modules.te`` takes from Transformer Engine.

``StandInGroupedLinear`` follows ``transformer_engine.pytorch.GroupedLinear`` where the module
relies on it: ``weight{i} [out, in]`` / ``bias{i} [out]`` parameters (an empty tensor attribute
without bias), ``forward(inp, m_splits: list[int])`` with host split sizes, ``return_bias``,
excluded from Dynamo, a ``get_extra_state`` (like TE's FP8 metadata, it must not reach the
state dict), and — like TE's uninitialised wgrad buffer — garbage (NaN) weight and bias
gradients for a GEMM with no rows.  ``row_alignment`` plays an FP8 autocast: every split must
then be a multiple of it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from moe_modules.te import engine as te_engine


class _NaNGradForEmpty(torch.autograd.Function):
    """Identity whose backward returns NaN: what an unwritten wgrad buffer could hold."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class StandInGroupedLinear(nn.Module):
    def __init__(self, engine, num_gemms, in_features, out_features, *, bias, return_bias, params_dtype, device):
        super().__init__()
        self.engine, self.num_gemms = engine, num_gemms
        self.use_bias, self.return_bias = bias, return_bias
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", nn.Parameter(
                torch.randn(out_features, in_features, dtype=params_dtype, device=device) * 0.023))
            if bias:
                self.register_parameter(f"bias{i}", nn.Parameter(torch.zeros(out_features, dtype=params_dtype,
                                                                             device=device)))
            else:
                setattr(self, f"bias{i}", torch.Tensor().to(dtype=params_dtype, device=device))
        self.calls = 0

    @torch._dynamo.disable  # TE's no_torch_dynamo: called directly under compile it breaks the graph
    def forward(self, inp, m_splits):
        assert isinstance(m_splits, list) and all(isinstance(m, int) for m in m_splits), m_splits
        assert len(m_splits) == self.num_gemms and sum(m_splits) == inp.shape[0], (m_splits, inp.shape)
        align = self.engine.alignment
        assert all(m % align == 0 for m in m_splits), f"splits {m_splits} not multiples of {align}"
        self.calls += 1
        self.engine.splits_seen.append(list(m_splits))
        outs = []
        for i, chunk in enumerate(torch.split(inp, m_splits)):
            w, b = getattr(self, f"weight{i}"), getattr(self, f"bias{i}")
            if m_splits[i] == 0:
                w = _NaNGradForEmpty.apply(w)
                b = _NaNGradForEmpty.apply(b) if self.use_bias else b
            apply_bias = self.use_bias and not self.return_bias
            outs.append(F.linear(chunk, w, b if apply_bias else None))
        out = torch.cat(outs)
        if self.return_bias:
            return out, [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
        return out

    def get_extra_state(self):
        return torch.tensor([self.calls])

    def set_extra_state(self, state):
        pass


class StandInEngine:
    def __init__(self, alignment: int = 1):
        self.alignment = alignment
        self.splits_seen: list = []

    def grouped_linear(self, num_gemms, in_features, out_features, *, bias, return_bias, params_dtype, device):
        return StandInGroupedLinear(self, num_gemms, in_features, out_features, bias=bias, return_bias=return_bias,
                                    params_dtype=params_dtype, device=device)

    def row_alignment(self) -> int:
        return self.alignment


@contextlib.contextmanager
def stand_in_engine(alignment: int = 1):
    """``GroupedExpertsTE`` builds and runs on the stand-in inside this context (no TE needed)."""
    engine = StandInEngine(alignment)
    saved = te_engine.load, te_engine.require_transformer_engine
    te_engine.load = lambda: engine
    te_engine.require_transformer_engine = lambda: None
    try:
        yield engine
    finally:
        te_engine.load, te_engine.require_transformer_engine = saved
