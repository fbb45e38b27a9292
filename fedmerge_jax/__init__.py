"""fedmerge_jax: a vectorised JAX simulator for personalised FL by model merging (FedMerge)."""

__version__ = "0.1.0"
