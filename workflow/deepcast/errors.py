"""The one error type users see: a message that says what is wrong and how to fix it."""


class DeepcastError(Exception):
    """Bad input or an unmet precondition; the CLI prints it alone and exits 2."""
