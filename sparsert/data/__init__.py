"""Text data that ships with installed packages: :mod:`sparsert.data.corpus`."""
