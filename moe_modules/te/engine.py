"""What GroupedExpertsTE takes from Transformer Engine: the import, ``GroupedLinear`` and the FP8
row alignment, all looked up lazily (nothing imports Transformer Engine at import time)."""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from torch import nn

INSTALL_HINT = (
    "GroupedExpertsTE needs Transformer Engine (transformer_engine.pytorch), which is not installed. "
    "On a CUDA machine, install it from this checkout with: pip install -e '.[te]' "
    "(NVIDIA's transformer-engine[pytorch]; the package index's 'moe-ops' is an unrelated project)."
)


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def require_transformer_engine() -> None:
    if importlib.util.find_spec("transformer_engine") is None:
        raise ImportError(INSTALL_HINT)
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # a broken install says so, with the hint
        raise ImportError(f"{INSTALL_HINT} Importing it failed: {e}") from e


class TransformerEngineAPI:
    """``GroupedLinear`` construction and the FP8 row alignment, imported lazily.

    The CPU tests substitute a stand-in with the same two methods (:func:`load` is what the module calls).
    """

    def grouped_linear(self, num_gemms: int, in_features: int, out_features: int, *, bias: bool,
                       return_bias: bool, params_dtype: torch.dtype, device) -> nn.Module:
        import transformer_engine.pytorch as te

        return te.GroupedLinear(num_gemms, in_features, out_features, bias=bias, return_bias=return_bias,
                                params_dtype=params_dtype, device=device)

    def row_alignment(self) -> int:
        """Rows per expert must be a multiple of this for the current GEMMs: 1 unless a TE FP8/FP4
        autocast is active (16 for per-tensor FP8, 32 for MXFP8, as Transformer Engine reports)."""
        q = _te_quantization()
        if not q.FP8GlobalStateManager.is_fp8_enabled():
            return 1
        recipe = q.FP8GlobalStateManager.get_fp8_recipe()
        if hasattr(q, "get_align_size_for_quantization"):
            return int(q.get_align_size_for_quantization(recipe))
        if getattr(recipe, "mxfp8", lambda: False)():
            return 32
        return 16


@functools.lru_cache(maxsize=None)
def _te_quantization():
    try:  # TE >= 2.8 keeps the FP8 state in .quantization, older releases in .fp8
        return importlib.import_module("transformer_engine.pytorch.quantization")
    except ImportError:
        return importlib.import_module("transformer_engine.pytorch.fp8")


def load() -> TransformerEngineAPI:
    return TransformerEngineAPI()
