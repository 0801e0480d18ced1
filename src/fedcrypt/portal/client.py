"""The hospital's (and admin's) HTTP client for the portal's JSON API."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from fedcrypt.exceptions import FedcryptError
from fedcrypt.portal.schemas import (
    FederationPublic,
    MetricsPublic,
    RoundPublic,
    SecAggAttemptPublic,
    SecAggMemberPublic,
    SecAggReplyPublic,
    SecAggTurn,
    TokenPublic,
    UploadPublic,
    UserPublic,
)

API = "/api/v1"
CHUNK = 1 << 20


class PortalClientError(FedcryptError):
    """The portal refused a request or could not be reached.

    Attributes
    ----------
    status_code : int or None
        The HTTP status, ``None`` when the portal could not be reached.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code

    @property
    def transient(self) -> bool:
        """Whether retrying may help: the portal was unreachable or answered 502-504."""
        return self.status_code is None or self.status_code in (502, 503, 504)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class PortalClient:
    """Talk to a portal as one account.

    Parameters
    ----------
    base_url : str
        The portal's address, e.g. ``http://127.0.0.1:8000``.
    token : str, optional
        An API token (from the account page or :meth:`issue_token`).
    timeout : float
        Seconds to wait for the portal per request (default: 300).
    http : httpx.Client, optional
        A client to use instead of a new one (tests pass Starlette's ``TestClient``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 300.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._owns_http = http is None
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> PortalClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (if this client created it)."""
        if self._owns_http:
            self._http.close()

    # --- plumbing -----------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _check(self, response: httpx.Response, what: str) -> httpx.Response:
        if response.is_success:
            return response
        try:
            response.read()
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError, httpx.ResponseNotRead):
            detail = response.text
        if isinstance(detail, list):  # FastAPI validation errors
            detail = "; ".join(
                f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail
            )
        raise PortalClientError(
            f"{what}: the portal answered HTTP {response.status_code}: {detail}",
            status_code=response.status_code,
        )

    def _request(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        headers = self._headers(kwargs.pop("headers", None))
        try:
            response = self._http.request(method, API + path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise PortalClientError(
                f"{what}: cannot reach the portal at {self.base_url}: {exc}"
            ) from exc
        return self._check(response, what)

    def _download(self, path: str, dest: Path, *, what: str) -> str:
        """Stream a file to ``dest`` (atomically), checking ``X-Content-SHA256``."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        h = hashlib.sha256()
        try:
            with self._http.stream("GET", API + path, headers=self._headers()) as response:
                self._check(response, what)
                expected = response.headers.get("x-content-sha256")
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(CHUNK):
                        h.update(chunk)
                        f.write(chunk)
        except httpx.TransportError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise PortalClientError(
                f"{what}: cannot reach the portal at {self.base_url}: {exc}"
            ) from exc
        digest = h.hexdigest()
        if expected and expected != digest:
            tmp.unlink()
            raise PortalClientError(
                f"{what}: the download is corrupt (SHA-256 {digest}, the portal says {expected})"
            )
        os.replace(tmp, dest)
        return digest

    # --- accounts -----------------------------------------------------------------------

    def register(self, *, name: str, email: str, password: str) -> UserPublic:
        """Register a hospital (it stays pending until the admin approves it)."""
        r = self._request(
            "POST",
            "/hospitals",
            what="registration",
            json={"name": name, "email": email, "password": password},
        )
        return UserPublic.model_validate(r.json())

    def issue_token(self, *, email: str, password: str) -> TokenPublic:
        """Exchange e-mail and password for a new API token (and use it from now on)."""
        r = self._request(
            "POST", "/auth/token", what="sign-in", json={"email": email, "password": password}
        )
        out = TokenPublic.model_validate(r.json())
        self.token = out.token
        return out

    def me(self) -> UserPublic:
        """The account behind the token."""
        return UserPublic.model_validate(self._request("GET", "/users/me", what="account").json())

    def hospitals(self, *, status: str | None = None) -> list[UserPublic]:
        """Hospital accounts (admin)."""
        params = {"status": status} if status else None
        r = self._request("GET", "/hospitals", what="hospital list", params=params)
        return [UserPublic.model_validate(x) for x in r.json()]

    def decide(self, hospital_id: int, decision: str) -> UserPublic:
        """Approve, reject or suspend a hospital (admin)."""
        r = self._request("POST", f"/hospitals/{hospital_id}/{decision}", what=decision)
        return UserPublic.model_validate(r.json())

    def audit(self, *, limit: int = 50, action: str | None = None) -> list[dict[str, Any]]:
        """The newest audit events (admin)."""
        params: dict[str, Any] = {"limit": limit}
        if action:
            params["action"] = action
        out: list[dict[str, Any]] = self._request(
            "GET", "/audit", what="audit log", params=params
        ).json()
        return out

    # --- federations --------------------------------------------------------------------

    def federations(self) -> list[FederationPublic]:
        """Every federation."""
        r = self._request("GET", "/federations", what="federation list")
        return [FederationPublic.model_validate(x) for x in r.json()]

    def federation(self, ref: int | str) -> FederationPublic:
        """A federation by id or by name.

        Raises
        ------
        PortalClientError
            If there is no such federation.
        """
        if isinstance(ref, int) or str(ref).isdigit():
            r = self._request("GET", f"/federations/{int(ref)}", what=f"federation {ref}")
            return FederationPublic.model_validate(r.json())
        for fed in self.federations():
            if fed.name == ref:
                return fed
        raise PortalClientError(f"no federation named {ref!r} on the portal", status_code=404)

    def create_federation(self, **fields: Any) -> FederationPublic:
        """Create a federation (admin); see :class:`~fedcrypt.portal.schemas.FederationCreate`."""
        r = self._request("POST", "/federations", what="create federation", json=fields)
        return FederationPublic.model_validate(r.json())

    def update_federation(self, federation_id: int, **fields: Any) -> FederationPublic:
        """Correct a federation (admin); see :class:`~fedcrypt.portal.schemas.FederationUpdate`."""
        r = self._request(
            "PATCH", f"/federations/{federation_id}", what="update federation", json=fields
        )
        return FederationPublic.model_validate(r.json())

    def cancel_federation(self, federation_id: int, *, reason: str = "") -> FederationPublic:
        """Cancel a federation (admin): its open round closes, uploads are refused."""
        r = self._request(
            "POST",
            f"/federations/{federation_id}/cancel",
            what="cancel federation",
            json={"reason": reason},
        )
        return FederationPublic.model_validate(r.json())

    def put_server_key(self, federation_id: int, path: Path) -> FederationPublic:
        """Upload an he federation's public ``server.key`` (admin)."""
        with open(path, "rb") as f:
            r = self._request(
                "PUT",
                f"/federations/{federation_id}/server-key",
                what="server key upload",
                content=f,
                headers={"Content-Type": "application/octet-stream"},
            )
        return FederationPublic.model_validate(r.json())

    def put_registry(self, federation_id: int, path: Path) -> FederationPublic:
        """Upload a secagg federation's public ``registry.pub`` (admin)."""
        with open(path, "rb") as f:
            r = self._request(
                "PUT",
                f"/federations/{federation_id}/registry",
                what="registry upload",
                content=f,
                headers={"Content-Type": "application/octet-stream"},
            )
        return FederationPublic.model_validate(r.json())

    def download_registry(self, federation_id: int, dest: Path) -> str:
        """Download a secagg federation's public ``registry.pub``; return its SHA-256."""
        return self._download(
            f"/federations/{federation_id}/registry", dest, what="registry download"
        )

    def put_initial_model(
        self, federation_id: int, path: Path, *, model_size: int | None = None
    ) -> FederationPublic:
        """Publish the initial model file and open round 1 (admin)."""
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Content-SHA256": file_sha256(path),
        }
        if model_size is not None:
            headers["X-Model-Size"] = str(model_size)
        with open(path, "rb") as f:
            r = self._request(
                "PUT",
                f"/federations/{federation_id}/initial-model",
                what="initial model upload",
                content=f,
                headers=headers,
            )
        return FederationPublic.model_validate(r.json())

    def download_initial_model(self, federation_id: int, dest: Path) -> str:
        """Download the initial model; return its SHA-256."""
        return self._download(
            f"/federations/{federation_id}/initial-model", dest, what="initial model download"
        )

    # --- rounds -------------------------------------------------------------------------

    def rounds(self, federation_id: int) -> list[RoundPublic]:
        """Every round of a federation."""
        r = self._request("GET", f"/federations/{federation_id}/rounds", what="round list")
        return [RoundPublic.model_validate(x) for x in r.json()]

    def round(self, federation_id: int, number: int) -> RoundPublic:
        """One round's state."""
        r = self._request(
            "GET", f"/federations/{federation_id}/rounds/{number}", what=f"round {number}"
        )
        return RoundPublic.model_validate(r.json())

    def upload_update(self, federation_id: int, number: int, path: Path) -> UploadPublic:
        """Stream a protected update file to the portal with its SHA-256."""
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Content-SHA256": file_sha256(path),
        }
        with open(path, "rb") as f:
            r = self._request(
                "PUT",
                f"/federations/{federation_id}/rounds/{number}/update",
                what=f"upload for round {number}",
                content=f,
                headers=headers,
            )
        return UploadPublic.model_validate(r.json())

    def uploads(self, federation_id: int, number: int) -> list[UploadPublic]:
        """Upload metadata of a round."""
        r = self._request(
            "GET", f"/federations/{federation_id}/rounds/{number}/uploads", what="upload list"
        )
        return [UploadPublic.model_validate(x) for x in r.json()]

    def download_upload(self, upload_id: int, dest: Path) -> str:
        """Download one stored update (own uploads only, or any as admin)."""
        return self._download(f"/uploads/{upload_id}/content", dest, what=f"upload {upload_id}")

    def download_aggregate(self, federation_id: int, number: int, dest: Path) -> str:
        """Download a round's protected aggregate; return its SHA-256."""
        return self._download(
            f"/federations/{federation_id}/rounds/{number}/aggregate",
            dest,
            what=f"aggregate of round {number}",
        )

    def exclude_upload(
        self, federation_id: int, number: int, upload_id: int, *, reason: str
    ) -> UploadPublic:
        """Leave an update out of its round's aggregate (admin)."""
        r = self._request(
            "POST",
            f"/federations/{federation_id}/rounds/{number}/uploads/{upload_id}/exclude",
            what=f"exclude upload {upload_id}",
            json={"reason": reason},
        )
        return UploadPublic.model_validate(r.json())

    def force_aggregate(self, federation_id: int, number: int) -> RoundPublic:
        """Aggregate an open (or failed) round now if its quorum is met (admin)."""
        r = self._request(
            "POST", f"/federations/{federation_id}/rounds/{number}/aggregate", what="aggregate"
        )
        return RoundPublic.model_validate(r.json())

    def report_metrics(
        self,
        federation_id: int,
        number: int,
        *,
        loss: float,
        accuracy: float,
        auc: float | None,
        num_examples: int,
    ) -> MetricsPublic:
        """Report metrics of a round's decrypted global model."""
        r = self._request(
            "POST",
            f"/federations/{federation_id}/rounds/{number}/metrics",
            what=f"metrics for round {number}",
            json={"loss": loss, "accuracy": accuracy, "auc": auc, "num_examples": num_examples},
        )
        return MetricsPublic.model_validate(r.json())

    def metrics(self, federation_id: int, number: int) -> list[MetricsPublic]:
        """Every hospital's metrics for a round."""
        r = self._request(
            "GET", f"/federations/{federation_id}/rounds/{number}/metrics", what="metrics"
        )
        return [MetricsPublic.model_validate(x) for x in r.json()]

    # --- secagg ---------------------------------------------------------------------------

    def secagg_enrol(
        self, federation_id: int, *, hospital_id: int, signature: str
    ) -> SecAggMemberPublic:
        """Enrol this account as hospital ``hospital_id`` of the registry (signed proof)."""
        r = self._request(
            "POST",
            f"/federations/{federation_id}/secagg/members",
            what="secagg enrolment",
            json={"hospital_id": hospital_id, "signature": signature},
        )
        return SecAggMemberPublic.model_validate(r.json())

    def secagg_members(self, federation_id: int) -> list[SecAggMemberPublic]:
        """The hospitals enrolled in a secagg federation."""
        r = self._request(
            "GET", f"/federations/{federation_id}/secagg/members", what="secagg members"
        )
        return [SecAggMemberPublic.model_validate(x) for x in r.json()]

    def secagg_turn(self, federation_id: int, number: int) -> SecAggTurn:
        """What this hospital should do now in round ``number``."""
        r = self._request(
            "GET",
            f"/federations/{federation_id}/rounds/{number}/secagg/turn",
            what=f"secagg turn of round {number}",
        )
        return SecAggTurn.model_validate(r.json())

    def secagg_join(self, federation_id: int, number: int) -> SecAggTurn:
        """Check in for round ``number``'s secure-aggregation session."""
        r = self._request(
            "POST",
            f"/federations/{federation_id}/rounds/{number}/secagg/join",
            what=f"joining round {number}",
        )
        return SecAggTurn.model_validate(r.json())

    def secagg_request(self, federation_id: int, number: int) -> tuple[str, bytes]:
        """The request awaiting this hospital's answer: ``(stage, bytes)`` (checksum checked).

        Raises
        ------
        PortalClientError
            If none awaits it, or the download is corrupt.
        """
        r = self._request(
            "GET",
            f"/federations/{federation_id}/rounds/{number}/secagg/request",
            what=f"secagg request of round {number}",
        )
        data = r.content
        expected = r.headers.get("x-content-sha256")
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise PortalClientError(f"the secagg request of round {number} arrived corrupt")
        return str(r.headers.get("x-secagg-stage", "")), data

    def secagg_reply(self, federation_id: int, number: int, data: bytes) -> SecAggReplyPublic:
        """Send this hospital's signed reply to the running stage of round ``number``."""
        r = self._request(
            "PUT",
            f"/federations/{federation_id}/rounds/{number}/secagg/reply",
            what=f"secagg reply for round {number}",
            content=data,
            headers={
                "Content-Type": "application/octet-stream",
                "X-Content-SHA256": hashlib.sha256(data).hexdigest(),
            },
        )
        return SecAggReplyPublic.model_validate(r.json())

    def secagg_sessions(self, federation_id: int, number: int) -> list[SecAggAttemptPublic]:
        """Round ``number``'s secure-aggregation sessions with their stage progress."""
        r = self._request(
            "GET",
            f"/federations/{federation_id}/rounds/{number}/secagg",
            what=f"secagg progress of round {number}",
        )
        return [SecAggAttemptPublic.model_validate(x) for x in r.json()]

    def wait_for_aggregate(
        self,
        federation_id: int,
        number: int,
        *,
        poll_s: float = 2.0,
        timeout_s: float = 3600.0,
        on_wait: Callable[[RoundPublic], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> RoundPublic:
        """Poll until round ``number`` is aggregated.

        Parameters
        ----------
        poll_s : float
            Seconds between polls (default: 2).
        timeout_s : float
            Give up after this many seconds (default: 3600).
        on_wait : callable, optional
            Called with the round's state after every poll that finds it not ready.

        A ``failed`` round keeps being waited for (the admin excludes the update it
        blames, or its hospital uploads again); ``on_wait`` sees its ``error``.

        Raises
        ------
        PortalClientError
            On timeout, or when the round was cancelled.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                state: RoundPublic | None = self.round(federation_id, number)
            except PortalClientError as exc:
                if not exc.transient:
                    raise
                state = None  # the portal is restarting or unreachable: keep waiting
            if state is not None and state.status == "aggregated":
                return state
            if state is not None and state.status == "cancelled":
                raise PortalClientError(f"round {number} was cancelled by the admin")
            if state is not None and on_wait is not None:
                on_wait(state)
            if time.monotonic() >= deadline:
                progress = (
                    f" ({state.num_uploads} of {state.expected_uploads} updates, quorum "
                    f"{state.quorum})"
                    if state is not None
                    else " (the portal is unreachable)"
                )
                raise PortalClientError(
                    f"round {number} was not aggregated within {timeout_s:g} s{progress}"
                )
            sleep(poll_s)
