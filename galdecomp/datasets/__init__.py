"""Data sets other than the sky, as tables of rows x features (:mod:`.fashion_mnist`)."""
