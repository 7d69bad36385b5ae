"""The one exception type for bad input: the CLI turns it into one error line and exit status 2."""


class LmforgeError(Exception):
    """Bad input or usage: the message says what was given and what was expected."""


class RunFailed(Exception):
    """The work ran but failed a check the user asked for (e.g. the forgetting gate): exit status 1."""


class Interrupted(KeyboardInterrupt):
    """The user stopped a run (Ctrl-C): the message says the step reached and how to go on; exit status 130.

    A KeyboardInterrupt, so code between the loop and the CLI unwinds exactly as for a bare Ctrl-C."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
