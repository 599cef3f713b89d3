"""Small modules, inputs and comparisons shared by the compile/export tests.

Shapes are tiny on purpose (CI: 2 cores, 10 minutes for the whole folder).
``MOE_OPS_TEST_DEVICE=cuda`` runs the device-generic tests on a GPU.
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from moe_modules import GroupedExperts, GroupedExpertsDeepEP, MoEConfig

DEVICE = torch.device(os.environ.get("MOE_OPS_TEST_DEVICE", "cpu"))
E, K, D, I = 4, 2, 16, 8  # experts, experts per token, model dim, expert inner dim
TOKEN_COUNTS = (1, 7, 64, 300)  # every one runs through the same compiled graph
ACTIVATIONS = ("swiglu", "quick_geglu", "relu2")
DTYPES = (torch.float32, torch.bfloat16)
MODULES = (GroupedExperts, GroupedExpertsDeepEP)

# Relative error bounds (max |compiled - eager| / max |eager|, per tensor).  float32: the issue's
# bounds.  bfloat16: a compiler may keep a bf16 intermediate in float32 (or round it at another
# point) around the ops, which moves a value by up to one bf16 rounding (2**-8 relative), and
# that can happen once on the way in and once on the way out: two bf16 ulps.
RTOL = {
    ("aot_eager", torch.float32): 1e-6,
    ("inductor", torch.float32): 1e-5,
    ("aot_eager", torch.bfloat16): 2 * 2**-8,
    ("inductor", torch.bfloat16): 2 * 2**-8,
}


@dataclass(frozen=True)
class Case:
    """One expert-module configuration."""

    module: type
    activation: str
    bias: bool
    dtype: torch.dtype

    @property
    def id(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.module.__name__}-{self.activation}-{'bias' if self.bias else 'nobias'}-{dtype}"

    def config(self) -> MoEConfig:
        return MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I,
                         expert_activation=self.activation, expert_bias=self.bias, dtype=self.dtype)

    def build(self, seed: int = 0) -> nn.Module:
        """The module with weights large enough that the activations leave their linear range
        (and quick_geglu's clamp is hit), biases nonzero."""
        torch.manual_seed(seed)
        module = self.module(self.config())
        module.init_weights(DEVICE, init_std=0.5)
        module.to(DEVICE)
        if self.bias:
            with torch.no_grad():
                module.gate_up_proj_bias.normal_(0.0, 1.0)
                module.down_proj_bias.normal_(0.0, 1.0)
        return module


ALL_CASES = [Case(*c) for c in itertools.product(MODULES, ACTIVATIONS, (True, False), DTYPES)]


@dataclass(frozen=True)
class LoRACase(Case):
    """The LoRA module over ``Case``'s module (frozen base; nonzero adapters, B included)."""

    output_names = ("y", "grad_x", "grad_weights", "grad_lora_gate_and_up_A", "grad_lora_gate_and_up_B",
                    "grad_lora_down_A", "grad_lora_down_B")

    @property
    def id(self) -> str:
        return "LoRA-" + super().id

    def build(self, seed: int = 0) -> nn.Module:
        from moe_modules import GroupedExpertsDeepEPLoRA, GroupedExpertsLoRA

        wrap = GroupedExpertsLoRA if self.module is GroupedExperts else GroupedExpertsDeepEPLoRA
        module = wrap(super().build(seed), lora_dim=4, alpha=8)
        with torch.no_grad():
            for name in ("lora_gate_and_up_B", "lora_down_B"):
                getattr(module, name).normal_(0.0, 0.3)
        return module


LORA_CASES = [LoRACase(GroupedExperts, "swiglu", True, torch.float32),
              LoRACase(GroupedExpertsDeepEP, "quick_geglu", False, torch.bfloat16)]
REPRESENTATIVE = Case(GroupedExperts, "swiglu", True, torch.float32)


@functools.lru_cache(maxsize=None)
def module_of(case: Case) -> nn.Module:
    """One module per configuration, shared by the export and AOTInductor tests."""
    return case.build()


def eager(case: Case, T: int) -> Tensor:
    with torch.no_grad():
        return module_of(case)(*make_inputs(T, case.dtype))


EXPORT_T = 7  # the example token count of exported programs; they then run at RUN_TS
RUN_TS = (1, 300)


@functools.lru_cache(maxsize=None)
def export(case: Case, strict: bool) -> torch.export.ExportedProgram:
    """``module_of(case)`` exported with a ``Dim`` per input for dim 0, the README's recipe: the graph
    binds the four token counts to ``x``'s in ``moe::check_expert_inputs``, so a call whose counts
    differ reaches its ``ValueError`` (with one shared ``Dim`` the program asserts the equality
    itself before running: torch's ``AssertionError: Guard failed``)."""
    dynamic_shapes = {name: {0: torch.export.Dim(f"T_{name}")} for name in INPUT_NAMES}
    return torch.export.export(module_of(case), make_inputs(EXPORT_T, case.dtype), dynamic_shapes=dynamic_shapes,
                               strict=strict)


INPUT_NAMES = ("x", "token_mask", "weights", "indices")


def make_inputs(T: int, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x [T, D]``, ``token_mask [T]`` (about 1 in 5 tokens dropped), ``weights [T, K]`` and
    ``indices [T, K]`` with some ``-1`` (not routed): every kind of pair the modules must handle."""
    g = torch.Generator().manual_seed(1000 * seed + T)
    x = torch.randn(T, D, generator=g)
    token_mask = torch.rand(T, generator=g) > 0.2
    weights = torch.rand(T, K, generator=g)
    indices = torch.randint(-1, E, (T, K), generator=g)
    return x.to(DEVICE, dtype), token_mask.to(DEVICE), weights.to(DEVICE, dtype), indices.to(DEVICE)


def mark_tokens_dynamic(inputs: Sequence[Tensor]) -> None:
    """Dim 0 (tokens) of every input unbacked: one graph for every T, T=1 included
    (``mark_dynamic`` / ``dynamic=True`` still specialise T=1)."""
    for t in inputs:
        torch._dynamo.decorators.mark_unbacked(t, 0)


def forward_backward(fn: Callable, module: nn.Module, inputs: Sequence[Tensor], seed: int = 0,
                     tokens_dynamic: bool = False) -> list:
    """``[y, grad x, grad weights, grad of each parameter]`` for a fixed random output gradient."""
    x, token_mask, weights, indices = inputs
    x = x.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    if tokens_dynamic:  # on the tensors passed in: a clone does not keep the mark
        mark_tokens_dynamic((x, token_mask, weights, indices))
    module.zero_grad(set_to_none=True)
    y = fn(x, token_mask, weights, indices)
    g = torch.Generator().manual_seed(seed)
    y.backward(torch.randn(y.shape, generator=g).to(y.device, y.dtype))
    return [y.detach(), x.grad, weights.grad, *(p.grad for p in module.parameters() if p.requires_grad)]


OUTPUT_NAMES = ("y", "grad_x", "grad_weights", "grad_gate_and_up_projs", "grad_down_projs",
                "grad_gate_up_proj_bias", "grad_down_proj_bias")


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (0 when both are all zero)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_close(actual: Sequence[Optional[Tensor]], expected: Sequence[Optional[Tensor]], rtol: float,
                 what: str = "", names: Sequence[str] = OUTPUT_NAMES) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} results, expected {len(expected)}"
    for name, a, e in zip(names, actual, expected):
        assert e is not None, f"{what}: eager gave no {name}"
        assert a is not None, f"{what}: compiled gave no {name}"
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {name} {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        err = relative_error(a, e)
        assert err <= rtol, f"{what}: {name} relative error {err:.3g} > {rtol:.3g}"


FRESH_PROCESS_SCRIPT = os.path.join(os.path.dirname(__file__), "run_in_fresh_process.py")


def run_in_fresh_process(jobs: list, directory) -> dict:
    """Run ``jobs`` (see run_in_fresh_process.py) in a new Python process; its results."""
    import subprocess
    import sys

    jobs_path, out_path = os.path.join(directory, "jobs.pt"), os.path.join(directory, "outputs.pt")
    torch.save(jobs, jobs_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, FRESH_PROCESS_SCRIPT, jobs_path, out_path], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"fresh process failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return torch.load(out_path)
