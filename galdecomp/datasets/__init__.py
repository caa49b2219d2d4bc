"""Data sets as tables of features x samples with missing entries: the ``DataSet`` and
``SkyDataSet`` types and plain table files (:mod:`.table`), the Fashion-MNIST images
(:mod:`.fashion_mnist`)."""
