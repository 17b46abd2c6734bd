"""The one exception the user sees as a clean one-line error (exit code 2)."""


class QbertEdgeError(Exception):
    """A problem with the user's input: a bad file, a bad plan, a missing package.

    The command line prints ``qbert-edge: error: <message>`` and exits with code 2;
    the message names the file or the module and says what is wrong with it.
    """
