"""The one exception type for bad input: the CLI turns it into one error line and exit status 2."""


class LmforgeError(Exception):
    """Bad input or usage: the message says what was given and what was expected."""


class RunFailed(Exception):
    """The work ran but failed a check the user asked for (e.g. the forgetting gate): exit status 1."""
