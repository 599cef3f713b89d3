"""GroupedExpertsTE: the two expert GEMMs as Transformer Engine ``GroupedLinear`` modules."""

from __future__ import annotations

import importlib.util

from torch import nn

INSTALL_HINT = (
    "GroupedExpertsTE needs Transformer Engine (transformer_engine.pytorch), which is not installed. "
    "On a CUDA machine, install it with: pip install 'moe-ops[te]'  "
    "(or pip install 'transformer-engine[pytorch]')."
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


class GroupedExpertsTE(nn.Module):
    """Experts on Transformer Engine's GroupedLinear, with the stacked state-dict layout of the other modules."""

    def __init__(self, config, *args, **kwargs):
        require_transformer_engine()
        super().__init__()
        raise NotImplementedError("GroupedExpertsTE on Transformer Engine is built by the TE issue")
