"""``/uploads/{id}``: a single stored update (its uploader and the admin only)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from fedcrypt.portal.deps import CurrentUser, PortalDep, SessionDep, UploadId
from fedcrypt.portal.errors import ForbiddenError, NotFoundError
from fedcrypt.portal.models import Upload
from fedcrypt.portal.schemas import UploadPublic
from fedcrypt.portal.services import rounds as svc

router = APIRouter(prefix="/uploads", tags=["uploads"])


def _load(db: SessionDep, upload_id: UploadId, user: CurrentUser) -> Upload:
    up = db.get(Upload, upload_id)
    if up is None:
        raise NotFoundError(f"no upload with id {upload_id}")
    if not user.is_admin and up.user_id != user.id:
        raise ForbiddenError("this upload belongs to another hospital")
    return up


@router.get("/{upload_id}", response_model=UploadPublic)
def read_upload(upload_id: UploadId, db: SessionDep, user: CurrentUser) -> UploadPublic:
    """An upload's metadata (its uploader or the admin)."""
    return svc.upload_public(_load(db, upload_id, user))


@router.get("/{upload_id}/content", response_class=FileResponse)
def read_upload_content(
    upload_id: UploadId, portal: PortalDep, db: SessionDep, user: CurrentUser
) -> FileResponse:
    """An upload's protected bytes (its uploader or the admin; another hospital gets 403)."""
    up = _load(db, upload_id, user)
    return FileResponse(
        portal.store.path(up.sha256),
        media_type="application/octet-stream",
        filename=f"upload-{up.id}.fcry",
        headers={"X-Content-SHA256": up.sha256},
    )
