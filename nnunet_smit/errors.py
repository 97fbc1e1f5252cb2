"""Project exception types. The CLIs turn these into a one-line message and a non-zero exit code."""
from __future__ import annotations

import sys
from typing import Callable


class SMITError(Exception):
    """A user-facing error: the message is one sentence saying what is wrong and what to do."""


class CheckpointError(SMITError):
    """A checkpoint cannot be read, is of an unknown layout, or does not fit the network."""


class InputShapeError(SMITError, ValueError):
    """An input tensor breaks the architecture's size rule."""


def run_cli(call: Callable[[], object], output: str, interrupted: str) -> int:
    """Run a CLI's work and turn the project's errors into one line on stderr and an exit code.

    SMITError and OSError (an output folder that cannot be made or written; ``output`` names it when the error does
    not) give 2, Ctrl-C gives 130 with ``interrupted``; success gives 0.
    """
    try:
        call()
    except SMITError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {error.strerror or error}: {error.filename or output}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0
