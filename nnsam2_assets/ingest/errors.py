"""The error of a dataset as a whole (one scan's problems are ``core.imaging.ScanError`` and exclude only that
scan)."""


class DatasetError(ValueError):
    """A dataset folder or its description is invalid; the message names the file and the reason."""
