"""Exceptions that carry a message saying what to fix; the CLI prints them without a traceback."""


class PackerError(Exception):
    """Base class: the message is meant for the user."""

    exit_code = 2


class CheckpointError(PackerError):
    """The source checkpoint cannot be read or does not have the expected tensors."""


class MasksError(PackerError):
    """The masks (gates) file is malformed or does not fit the model."""


class ArtifactError(PackerError):
    """A packed artifact is missing, corrupted or inconsistent."""


class VerificationError(PackerError):
    """The packed model does not compute the same function as the source."""

    exit_code = 3
