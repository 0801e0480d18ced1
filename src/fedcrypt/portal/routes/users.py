"""``/users``: the calling account."""

from __future__ import annotations

from fastapi import APIRouter

from fedcrypt.portal.deps import CurrentUser
from fedcrypt.portal.schemas import UserPublic

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserPublic)
def read_me(user: CurrentUser) -> UserPublic:
    """The account behind the API token."""
    return UserPublic.model_validate(user)
