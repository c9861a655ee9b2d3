"""twinflow_jax: TwinFlow one-step generation in JAX/Flax.

Importing the package is light: it pulls in jax and numpy only. The loss lives in
`twinflow_jax.losses`, the sampler in `twinflow_jax.sampling`; models, data and the
trainer are imported from their own submodules.
"""

__version__ = "0.1.0"
