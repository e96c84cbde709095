"""User-facing errors: the CLI prints ``str(err)`` as one line on stderr and exits with ``code``."""


class UserError(Exception):
    """Bad input from the user (options, files, model names). Exit code 2, no traceback."""

    code = 2


class Interrupted(Exception):
    """The run was interrupted; a resumable partial artifact may have been written."""

    code = 130


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type where it has none): what a one-line error
    quotes of a library's failure."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
