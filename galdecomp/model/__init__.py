"""The probabilistic autoencoder: numpy kernels (mlp, fisher) behind NIFTy operators.

Nothing here knows about HEALPix: a data set is rows of features, one row per pixel (or
image, or table row); the sky is one kind of data set.

Array-shape convention (rows x features everywhere; the same letters in every docstring):

=====  ==============================================================================
``P``  rows (pixels) of a data set, or of one process's block of it (``P_local``)
``B``  rows of a minibatch or of a block of rows processed together
``C``  features (channels) of the data
``L``  latent features
``S``  posterior samples
``H``  width of a hidden layer of an MLP
=====  ==============================================================================

========================================  ===================  ====================================
array                                     shape                notes
========================================  ===================  ====================================
data (standardised)                       ``(P, C)``           NaN (or 0 with the mask) where missing
mask of observed entries                  ``(P, C)`` bool      True where measured
inverse noise variance                    ``(B, C)``           0 where missing
latent mean / std / draws ``xi``          ``(P, L)``
latent covariance, Fisher metric ``M``    ``(P, L, L)``        ``M = J^T N^-1 J + 1``
Cholesky factor and its inverse           ``(B, L, L)``        lower triangular
decoder Jacobian ``J`` (stored ``Jt``)    ``(B, C, L)``        ``Jt``: ``(B, L, C)``
decoder output ``f(z)``                   ``(B, C)``
posterior samples                         ``(S, P, L)``
flat parameters                           ``(n_params,)``
========================================  ===================  ====================================

Data sets themselves (:class:`galdecomp.datasets.table.DataSet`) store features x samples
``(C, P)``, the layout of a stack of maps; the model's entry points take rows ``(P, C)``.
"""
