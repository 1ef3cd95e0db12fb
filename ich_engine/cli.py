"""How every command line ends: a user's mistake is one line and an exit code, a bug a traceback.

``run_main(main)`` runs ``main(argv)``; a :class:`~ich_engine.errors.UserError` (config, file, row,
checkpoint) prints ``error: <message>`` on stderr and returns its exit code (2 usage, 1 data), so
does a full disk or a file over the shell's size limit (``ulimit -f``), naming the path, and an
out-of-memory error. ``--debug`` anywhere on the command line shows the traceback instead.
Warnings print as ``warning: <message>``, one line each.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import resource
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from .errors import UserError

__all__ = ["console_main", "plain_warnings", "run_main", "user_message"]


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Within it, each warning is one line, ``warning: <message>``, on stderr: these are for the user
    (gantry tilt, uneven steps, series left out), not for a developer's file and line."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def user_message(err: UserError) -> str:
    """The error's one line; one raised in a DataLoader worker arrives re-raised with the worker's
    traceback as its message ("Caught ... Original Traceback ..."), whose last line is the error."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last.removeprefix(name)


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    with plain_warnings():
        try:
            return main(argv)
        except UserError as err:
            if debug:
                raise
            print(f"error: {user_message(err)}", file=sys.stderr)
            return err.exit_code
        except OSError as err:
            if debug or err.errno not in (errno.ENOSPC, errno.EFBIG):
                raise
            written = err.filename or "an output file"
            if err.errno == errno.ENOSPC:
                print(f"error: no space left on the device writing {written}", file=sys.stderr)
            else:
                limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
                print(
                    f"error: {written}: file too large for this shell's file size limit "
                    f"(ulimit -f: {limit} bytes); raise it (ulimit -f unlimited) and run again",
                    file=sys.stderr,
                )
            return 1
        except KeyboardInterrupt:
            if debug:
                raise
            print("error: interrupted (a training run resumes with --resume)", file=sys.stderr)
            return 130
        except torch.OutOfMemoryError as err:
            if debug:
                raise
            print(
                f"error: out of memory ({str(err).splitlines()[0]}); lower --batch_size, or use "
                "--use_mixed_precision (and gradient checkpointing, where the command has it)",
                file=sys.stderr,
            )
            return 1


def console_main(main: Callable[[list[str]], int]) -> Callable[[], int]:
    """The function a console script (``[project.scripts]`` in pyproject.toml) calls: ``main`` on
    ``sys.argv`` through :func:`run_main`."""
    return functools.partial(run_main, main)
