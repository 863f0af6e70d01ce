"""Errors a user can act on. The command line prints them as one line, never a traceback."""


class RetinaFastError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""


class DatasetError(RetinaFastError, ValueError):
    """A dataset that cannot be used: malformed annotations, unknown class ids, no images."""
