"""XLA:CPU kernels: `library` builds and registers the C++ library; `attention`, `norm` and `gelu`
wrap its custom calls with their gradients (float32, one device)."""
