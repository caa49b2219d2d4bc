"""Fashion-MNIST (Xiao et al. 2017) as a table: 28 x 28 images as rows of 784 pixel features.

The idx files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); another folder is given by ``root`` or the environment
variable ``GALDECOMP_FASHION_MNIST``. Nothing is downloaded.

Pixels (intensities in [0, 1]) are modelled with the Gaussian likelihood of the package on
logit-transformed pixels (:func:`image_preprocessor`, the ``logit`` kind of
:class:`~galdecomp.preprocessing.ChannelTransform`).
"""
import gzip
import os

import numpy as np

from ..errors import InputError
from ..preprocessing import ChannelTransform, Preprocessor

__all__ = ["load_fashion_mnist", "read_idx", "image_preprocessor", "PRESET", "CLASSES", "DEFAULT_ROOT",
           "LOGIT_EPS"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
#: eps of the logit transform of pixels: y = logit(eps + (1 - 2 eps) x). At L = 10 (diagonal, 8 epochs)
#: the test pixel MSE is 0.0212 / 0.0177 / 0.0161 for eps 1e-3 / 1e-2 / 5e-2 (benchmarks/history/2026-12.md)
LOGIT_EPS = 1e-2
#: fit configuration for 784-pixel images (overrides of :data:`galdecomp.inference.config.DEFAULTS`).
#: Widths chosen for cost (a diagonal epoch on 60,000 images in ~10 s on one core), not swept;
#: learning rate from a probe at L = 10 on 6,000 images, 4 epochs (test pixel MSE 0.053 at 3e-3,
#: 0.039 at 1e-2, 0.034 at 3e-2, 0.042 at 6e-2), Adam steps on the excitations and the mean
#: validation ELBO picking the kept epoch, as measured; 8 epochs as in benchmarks/science/bench_fashion.py.
PRESET = {
    "encoder": {"hidden": [256, 128]},
    "decoder": {"hidden": [128, 256]},
    "noise": {"floor": 0.01},
    "training": {"batch_size": 128, "max_epochs": 8, "learning_rate": 3e-2, "min_learning_rate": 1e-4,
                 "step_on": "excitations", "select": "mean",
                 "kl_warmup_epochs": 1, "validation_fraction": 0.1, "dtype": "float32"},
}

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read an idx file (gzipped if its name ends in ``.gz``) into an array.

    Parameters
    ----------
    path : str

    Returns
    -------
    ndarray
        Shape and type from the file's header.

    Raises
    ------
    InputError
        The file is not an idx file or is truncated.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise InputError(f"{path}: not an idx file")
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_DTYPES[raw[2]])
    n = int(np.prod(shape))
    if len(raw) != 4 + 4 * ndim + n * dtype.itemsize:
        raise InputError(f"{path}: idx header says {shape}, the file has another length")
    return np.frombuffer(raw, dtype, n, 4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split="train", root=None):
    """Fashion-MNIST images and labels.

    Parameters
    ----------
    split : {"train", "test"}
        60,000 training or 10,000 test images.
    root : str, optional
        Folder of the ``*-ubyte.gz`` files; default ``$GALDECOMP_FASHION_MNIST``, else
        :data:`DEFAULT_ROOT`.

    Returns
    -------
    images : ndarray, shape (N, 784), float64
        Pixel intensities in [0, 1], rows in the files' order (row-major 28 x 28).
    labels : ndarray, shape (N,), int64
        Class index (:data:`CLASSES`).

    Raises
    ------
    InputError
        The files are missing (one line saying how to install them) or damaged.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = root or os.environ.get("GALDECOMP_FASHION_MNIST") or DEFAULT_ROOT
    prefix = "train" if split == "train" else "t10k"
    paths = [os.path.join(root, f"{prefix}-{k}-ubyte.gz") for k in ("images-idx3", "labels-idx1")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{missing[0]}: Fashion-MNIST not found (apt-get install dataset-fashion-mnist, "
                         f"or set GALDECOMP_FASHION_MNIST to the folder of its idx files)")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(f"{paths[0]}: images {images.shape} and labels {labels.shape} do not match")
    return images.reshape(len(images), -1) / 255.0, labels.astype(np.int64)


def image_preprocessor(images, eps=LOGIT_EPS):
    """One ``logit`` transform fitted on all pixels of ``images``, shared by every pixel.

    A per-pixel standardisation would blow up the border pixels, which are 0 in almost every
    image; pixels share one unit, so they share one transform.

    Parameters
    ----------
    images : ndarray, shape (N, C)
        Intensities in [0, 1].
    eps : float

    Returns
    -------
    Preprocessor
        Channels ``px000`` ... (row-major).
    """
    tr = ChannelTransform.fit(np.asarray(images).ravel(), "logit", "pixels", logit_eps=eps)
    C = np.shape(images)[1]
    return Preprocessor([ChannelTransform(**vars(tr)) for _ in range(C)], [f"px{i:03d}" for i in range(C)])
