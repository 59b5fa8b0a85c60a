"""The datasets and neutral texts shipped with caa: the package caa._data, which is data/ in the
repository (see pyproject.toml). Read them through caa.datasets."""
