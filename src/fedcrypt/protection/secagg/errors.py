"""Specific errors of the ``secagg`` protocol (subclasses of the fedcrypt tree)."""

from __future__ import annotations

from fedcrypt.exceptions import ConfigError, DropoutError, ProtocolError


class SignatureError(ProtocolError):
    """A message has a bad Ed25519 signature or names a sender with no registered key.

    A reply signed by a key that is not in the consortium registry (an impostor, a
    hospital of another consortium) fails here: either its sender id is unregistered, or
    its signature does not verify under the registered key of the sender it names.
    """


class ReplayError(ProtocolError):
    """A message belongs to another round or stage, or a stage is answered twice.

    Raised for a request or reply of an earlier round, a reply to another stage of this
    round, a second reply of one hospital in one stage, a round number that is not newer
    than the last one a hospital joined (also across restarts, with a state file), and a
    second survivor set to sign or a second set of shares to reveal in one session.
    """


class SessionMismatchError(ProtocolError):
    """A message (request, reply, shares or aggregate) is for another session.

    The session is the SHA-256 of the round configuration, which includes the server's
    random nonce, the invited hospitals and the round number: a message of another run
    or of another configuration of the same round is refused.
    """


class DeadlineError(ProtocolError):
    """A hospital's reply reached the server after the stage's deadline.

    Attributes
    ----------
    late_by : float
        Seconds past the deadline.
    """

    def __init__(self, message: str, *, late_by: float) -> None:
        super().__init__(message)
        self.late_by = late_by


class ShareAuthenticationError(ProtocolError):
    """An encrypted Shamir share fails authenticated decryption (AES-GCM).

    Also what a share encrypted for another session, round, sender or receiver raises:
    those are its associated data.
    """


class ShareVerificationError(ProtocolError):
    """Shares reconstruct a secret that does not match its commitment or public key."""


class ViewMismatchError(ProtocolError):
    """A hospital answered a request other than the one the server sent (tampered request)."""


class ConsistencyError(ProtocolError):
    """The consistency check failed: a hospital refuses to sign or to reveal its shares.

    Bonawitz et al. 2017 (§4, the active-server variant): a hospital signs the survivor
    set ``U3`` it was given and reveals shares only after verifying enough signatures of
    registered hospitals over that same set. Raised by a hospital when the survivor set
    is not a subset of what it saw at the previous stage (``U1 ⊇ U2 ⊇ U3 ⊇ U4``), when the
    unmask request names another set than the one it signed, lists signers outside the
    set, carries a signature that does not verify, or too few signatures. A server that shows
    different hospitals different survivor sets triggers it.
    """


class TooFewSurvivorsError(DropoutError):
    """Fewer hospitals than needed remain at some stage; the round is aborted.

    Raised by the server (too few valid replies: dropouts, late or refused replies) and
    by a hospital (the server forwarded fewer peers than the protocol needs).

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


class StateFileError(ConfigError):
    """A hospital's secagg state file is unreadable, corrupt, of another hospital or unwritable."""
