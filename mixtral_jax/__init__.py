"""mixtral_jax: Mixtral 8x7B in JAX/Flax NNX, built for Mixture-of-Experts research."""
from mixtral_jax.config import ConfigError, ModelConfig, model_config_from
from mixtral_jax.model import KVCache, Mixtral, ModelOutput, build, param_count

__version__ = "0.1.0"
