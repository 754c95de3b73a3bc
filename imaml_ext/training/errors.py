"""The one exception of the command line."""


class RunError(Exception):
    """A problem with the command line or the run folder: printed without a traceback."""

