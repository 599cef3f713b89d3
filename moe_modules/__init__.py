"""Expert modules built only from ``moe_ops`` ops, with NeMo AutoModel's state-dict layout."""

from moe_modules.config import MoEConfig
from moe_modules.deepep import GroupedExpertsDeepEP
from moe_modules.grouped_experts import GroupedExperts
from moe_modules.parallel import apply_ep
from moe_modules.te import GroupedExpertsTE

__all__ = ["MoEConfig", "GroupedExperts", "GroupedExpertsDeepEP", "GroupedExpertsTE", "apply_ep"]
