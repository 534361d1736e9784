"""uhd_jax: LLaVA-UHD v4 / MiniCPM-V 4.6 in JAX/Flax."""

__version__ = "0.1.0"
