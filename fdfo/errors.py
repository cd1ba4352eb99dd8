"""The one base class of the errors a user can fix: the entry points print their message as one line."""


class UserError(Exception):
    """Bad input or a missing file: the message says what went wrong and what to do. The entry points
    print it without a traceback (set FDFO_DEBUG=1 to see one)."""
