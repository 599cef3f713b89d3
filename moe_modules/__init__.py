"""Expert modules built only from ``moe_ops`` ops, with NeMo AutoModel's state-dict layout.

Every module's forward is dispatch -> its experts -> combine (:mod:`moe_modules.ep`); expert
parallelism (:func:`apply_ep`) only changes the dispatcher.
"""

from moe_modules.config import MoEConfig
from moe_modules.ep import apply_ep
from moe_modules.grouped_experts import GroupedExperts, GroupedExpertsDeepEP
from moe_modules.te import GroupedExpertsTE
from moe_modules.lora import GroupedExpertsDeepEPLoRA, GroupedExpertsLoRA

__all__ = ["MoEConfig", "GroupedExperts", "GroupedExpertsDeepEP", "GroupedExpertsTE", "GroupedExpertsLoRA",
           "GroupedExpertsDeepEPLoRA", "apply_ep"]
