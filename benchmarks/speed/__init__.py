"""Speed: wall time of fits, training steps, kernels and products, against the PyTorch peer."""
