"""TPU kernels: `attention` wraps JAX's Pallas splash-attention kernel for the models' layout."""
