"""The probabilistic autoencoder: numpy kernels (mlp, fisher) behind NIFTy operators.

Nothing here knows about HEALPix: a data set is (n_samples, n_features) rows, one per pixel
(or image); the sky is one kind of data set.
"""
