"""beit3_jax: BEiT-3 ("Image as a Foreign Language") in JAX/Flax."""

__version__ = '0.1.0'
