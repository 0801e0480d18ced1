"""One exception tree for every error fedcrypt raises on purpose.

The CLI turns any :class:`FedcryptError` into one line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedcryptError(Exception):
    """Base class of all fedcrypt errors (a user or peer mistake, not a bug)."""


class ConfigError(FedcryptError, ValueError):
    """A run configuration or a command-line option is invalid."""


class InsecureParametersError(ConfigError):
    """Encryption parameters fail the HomomorphicEncryption.org 128-bit security table."""


class TaskError(ConfigError):
    """A :class:`fedcrypt.Task` is malformed: a missing attribute, a wrong return type, a
    model output that does not fit the labels, a dataset yielding non-tensors."""


class DataError(FedcryptError):
    """A dataset file is missing, unreadable or does not have the expected layout."""


class KeyMaterialError(FedcryptError):
    """A key file is missing, malformed, has unsafe permissions, or belongs to another context."""


class ProtocolError(FedcryptError):
    """A protected message is malformed, out of order, replayed or fails authentication."""


class DecryptionError(FedcryptError):
    """A ciphertext cannot be decrypted (no secret key, wrong key, or corrupted data)."""


class IntegrityError(DecryptionError):
    """A protected aggregate decrypts but fails its integrity check: it was corrupted or
    tampered with, or its example count disagrees with its header.

    Attributes
    ----------
    round : int or None
        The round the message claims (None if it names none).
    hospital : str or None
        The hospital concerned, where it can be known.
    """

    def __init__(self, message: str, *, round: int | None = None, hospital: str | None = None):
        super().__init__(message)
        self.round = round
        self.hospital = hospital


class ReplayError(IntegrityError):
    """A protected aggregate belongs to another round or run (replayed or out of order)."""


class AggregationError(FedcryptError):
    """The server cannot form an aggregate (too few updates, mismatched shapes or contexts)."""


class DropoutError(AggregationError):
    """Too many hospitals dropped out for the aggregate to be recovered."""


class DeploymentError(FedcryptError):
    """A Flower deployment (SuperLink/SuperNodes) could not start, or its run failed."""
