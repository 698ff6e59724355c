"""The leaves every package may import, and which import nothing of
ddep_jax: `writers` (local or gs:// files, JSON, PNG, the metric writers and
the workdir lock) and `tree_paths` (the one way to name pytree leaves and
config keys)."""
