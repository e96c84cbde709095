"""User-facing errors: the CLI prints ``str(err)`` as one line on stderr and exits with ``code``."""


class UserError(Exception):
    """Bad input from the user (options, files, model names). Exit code 2, no traceback."""

    code = 2


class Interrupted(Exception):
    """The run was interrupted; a resumable partial artifact may have been written."""

    code = 130
