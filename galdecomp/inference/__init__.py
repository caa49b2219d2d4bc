"""Inference: configuration, ELBO optimisation with checkpoints, posterior products."""
