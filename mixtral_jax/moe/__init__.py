"""The sparse MoE layer: `block.py` (MoEBlock), routers and balancing losses (registries), dispatch
strategies (`dispatch.py` for training, `dispatch_decode.py` for inference, `grouped.py` building blocks),
MoE metrics. Importing the package registers every router."""
from mixtral_jax.moe import routers, routers_extra  # noqa: F401  (routers_extra registers expert_choice, hash, aux_free_bias)
