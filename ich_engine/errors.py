"""The one base class of the mistakes a user can fix: a flag, a config key, a file, a manifest row.

Command lines (``ich_engine.cli.run_main``) show these as one line and an exit code, never as a
traceback: ``exit_code`` 2 for usage (flags, configs), 1 for data (files, rows, checkpoints).
"""


class UserError(Exception):
    """A problem in what the user gave; the message names the file, row, flag or key, what was
    expected and what was found."""

    exit_code = 1
