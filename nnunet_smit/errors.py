"""Project exception types. The CLIs turn these into a one-line message and a non-zero exit code."""


class SMITError(Exception):
    """A user-facing error: the message is one sentence saying what is wrong and what to do."""


class CheckpointError(SMITError):
    """A checkpoint cannot be read, is of an unknown layout, or does not fit the network."""


class InputShapeError(SMITError, ValueError):
    """An input tensor breaks the architecture's size rule."""
