"""The Mixtral architecture: `mixtral.py` (the one model class, its layouts and canonical weights),
`layers.py` (RMSNorm, rotary embeddings, the grouped-query attention layer) and `cache.py` (KVCache)."""
from mixtral_jax.model.mixtral import (  # noqa: F401
    REMAT, STACKED, DecoderLayer, KVCache, Mixtral, ModelOutput, abstract_model, abstract_params,
    active_param_count, advance_cache, build, to_canonical, embed_tokens, from_params, init_state, merge_trees, output_head,
    param_count, params_of, phase_of, prepare_inputs, split_experts, state_of, subtree, with_execution, with_state)
