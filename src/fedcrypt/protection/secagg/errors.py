"""Specific errors of the ``secagg`` protocol (subclasses of the fedcrypt tree)."""

from __future__ import annotations

from fedcrypt.exceptions import DropoutError, ProtocolError


class SignatureError(ProtocolError):
    """A hospital's message has a bad Ed25519 signature or an unregistered sender."""


class ReplayError(ProtocolError):
    """A message belongs to another round, or a stage is requested twice in one round."""


class ShareAuthenticationError(ProtocolError):
    """An encrypted Shamir share fails authenticated decryption (AES-GCM)."""


class ShareVerificationError(ProtocolError):
    """Shares reconstruct a secret that does not match its commitment or public key."""


class ViewMismatchError(ProtocolError):
    """A hospital answered a request other than the one the server sent (tampered request)."""


class TooFewSurvivorsError(DropoutError):
    """Fewer than ``threshold`` hospitals remain at some stage; the round is aborted.

    Attributes
    ----------
    stage : str
        The stage at which too few hospitals answered.
    survivors : int
        How many answered.
    threshold : int
        How many were needed.
    """

    def __init__(self, stage: str, survivors: int, threshold: int, detail: str = "") -> None:
        self.stage = stage
        self.survivors = survivors
        self.threshold = threshold
        msg = (
            f"secagg round aborted at stage {stage!r}: {survivors} hospital(s) remain, "
            f"threshold is {threshold}"
        )
        super().__init__(msg + (f" ({detail})" if detail else ""))
