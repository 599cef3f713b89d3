"""GroupedExpertsTE: the expert GEMMs on Transformer Engine's ``GroupedLinear``.

* :mod:`~moe_modules.te.engine`: what is taken from Transformer Engine (imported lazily);
* :mod:`~moe_modules.te.layout`: stacked x@W parameters <-> ``GroupedLinear``'s per-expert ones;
* :mod:`~moe_modules.te.experts`: the opaque op's body (the two GEMMs on expert-sorted rows);
* :mod:`~moe_modules.te.module`: the module (parameter views, state dict, sharding, forward).
"""

from moe_modules.te.engine import INSTALL_HINT, require_transformer_engine, transformer_engine_available
from moe_modules.te.module import GroupedExpertsTE

__all__ = ["GroupedExpertsTE", "INSTALL_HINT", "require_transformer_engine", "transformer_engine_available"]
