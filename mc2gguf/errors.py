"""The one exception type the command line turns into a clear message and a non-zero exit."""


class Mc2ggufError(Exception):
    """A user-facing error: bad input, a missing build, an impossible request."""
