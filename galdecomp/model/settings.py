"""The settings of the model's objects, bundled: the networks (:class:`Architecture`) and the
amortised ELBO (:class:`ELBOSettings`). The noise model has its own bundle, the likelihood
(:class:`~galdecomp.model.likelihood.GaussianLikelihood`: floor, sigma0, tau)."""
from dataclasses import dataclass

__all__ = ["Architecture", "ELBOSettings"]


@dataclass(frozen=True)
class Architecture:
    """The networks and posterior family of an :class:`~galdecomp.model.autoencoder.Autoencoder`.

    Attributes
    ----------
    decoder_hidden, encoder_hidden : tuple of int
        Hidden layer widths.
    decoder_activation, encoder_activation : str
        Names in :data:`galdecomp.model.mlp.ACTIVATIONS`.
    covariance : str
        Posterior family: a key of :data:`galdecomp.model.families.POSTERIORS`.
    dtype : str
        ``"float64"`` or ``"float32"`` for the MLP kernels.
    fisher_dtype : str, optional
        ``covariance="fisher"`` (or ``"fisher-scaled"``): the dtype of its Jacobian passes in training (None: ``dtype``).
    encoder_output_scale : float
        Factor of the initial excitations of the encoder's output layer.
    mask_input : str
        What the encoder's second C inputs hold (:func:`~galdecomp.model.elbo.encoder_input`):
        ``"missing"`` (1 where missing) or ``"observed"`` (the mask; older runs). With
        ``"missing"`` a row block without missing entries skips those inputs (all 0) in the
        encoder's first layer (:class:`~galdecomp.model.mlp.MLP` ``sparse_inputs``).
    block_rows : int
        Rows per block of a minibatch whose partial sums are formed separately (and may be
        computed by other processes); part of the arithmetic.
    """

    decoder_hidden: tuple = (128, 128)
    encoder_hidden: tuple = (128, 128)
    decoder_activation: str = "tanh"
    encoder_activation: str = "tanh"
    covariance: str = "diagonal"
    dtype: str = "float64"
    encoder_output_scale: float = 1.0
    mask_input: str = "missing"
    block_rows: int = 1024
    fisher_dtype: str = None

    @classmethod
    def from_config(cls, cfg):
        """The architecture of a resolved fit configuration (:mod:`galdecomp.inference.config`)."""
        return cls(tuple(cfg["decoder"]["hidden"]), tuple(cfg["encoder"]["hidden"]), cfg["decoder"]["activation"],
                   cfg["encoder"]["activation"], cfg["covariance"], cfg["training"]["dtype"],
                   cfg["encoder"]["output_scale"], cfg["encoder"]["mask_input"], cfg["training"]["block_rows"],
                   cfg["training"].get("fisher_dtype"))


@dataclass(frozen=True, eq=False)
class ELBOSettings:
    """The constants of an :class:`~galdecomp.model.elbo.AmortisedELBO` beside its networks and noise.

    Attributes
    ----------
    beta : float
        KL weight.
    n_total : int, optional
        Rows in the full training set (scales the prior terms); default the batch's rows.
    n_batch : int, optional
        Rows the data terms are averaged over; default the batch's rows. A pixel-sharded
        minibatch uses the global batch size, so that the ranks' energies add up to the global one.
    with_prior : bool
        Include the prior terms (one rank of a sharded energy only).
    mask_input : str
        How the encoder sees which entries are observed (:func:`~galdecomp.model.elbo.encoder_input`).
    block_rows : int
        Rows per block: the partial sums of a batch are formed per block of this many rows and
        added in block order, whoever computes the blocks, so results do not depend on how many
        compute them.
    encoder_scales, decoder_scales : ndarray, optional
        The networks' weight scales; default their ``init_scales()``.
    """

    beta: float = 1.0
    n_total: float = None
    n_batch: int = None
    with_prior: bool = True
    mask_input: str = "missing"
    block_rows: int = 1024
    encoder_scales: object = None
    decoder_scales: object = None
