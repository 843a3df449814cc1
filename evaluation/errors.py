"""The errors of data sets: one base class for "this data set cannot be used", one for unsafe ``.bin`` files."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset folder or file is missing pieces or does not follow its format."""


class BinFormatError(DatasetError):
    """An insightface ``.bin`` file is not a plain-data pickle of (images, is-same flags)."""
