"""warm_jax: WARM and WARP — weight averaging for reward models and RLHF policies, in JAX/Flax."""

__version__ = "0.1.0"
