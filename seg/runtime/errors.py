"""The one exception type for user mistakes: the CLI prints its message on one line and exits 1."""


class SegError(Exception):
    """A problem the user can fix (bad input, mismatched cache, missing file): no traceback."""
