"""bigmodel: one JAX/Flax code path from a laptop CPU to a pod, with scaling laws built in."""

__version__ = "0.1.0"
