"""Project exception types. The CLIs turn these into a one-line message and a non-zero exit code."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


class SMITError(Exception):
    """A user-facing error: the message is one sentence saying what is wrong and what to do."""


class CheckpointError(SMITError):
    """A checkpoint cannot be read, is of an unknown layout, or does not fit the network."""


class InputShapeError(SMITError, ValueError):
    """An input tensor breaks the architecture's size rule."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed by rerunning the same command."""

    def __init__(self, message: str, checkpoint_path: Path) -> None:
        super().__init__(message)
        self.message = message
        self.checkpoint_path = checkpoint_path


class TrainingDiverged(SMITError):
    """The weights stopped being finite numbers; the last checkpoint written before is kept."""


def describe_os_error(error: OSError) -> str:
    """One line for a file-system error: the path and what went wrong."""
    what = error.strerror or type(error).__name__
    path = error.filename if error.filename is not None else "a file"
    return f"{path}: {what}; check the path, its permissions and the free space."


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
