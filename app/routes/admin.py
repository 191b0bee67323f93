"""Write routes: each one needs the admin token (`SAESCOPE_ADMIN_TOKEN`), sent as
`Authorization: Bearer <token>` and compared in constant time. Reading stays open to everyone.
A server without a token has its write routes off: they answer 403 and say how to turn them on.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from app.deps import SettingsDep
from app.loader import unload_sae
from app.schemas import ErrorOut

bearer = HTTPBearer(auto_error=False, description="the server's admin token (SAESCOPE_ADMIN_TOKEN)")
WRITES_OFF = "write routes are off on this server: it has no admin token (set SAESCOPE_ADMIN_TOKEN to enable them)"


def require_admin(settings: SettingsDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    if settings.admin_token is None:
        raise HTTPException(403, WRITES_OFF)
    given = credentials.credentials.encode() if credentials else b""
    if not hmac.compare_digest(given, settings.admin_token.get_secret_value().encode()):
        raise HTTPException(401, "this route needs the admin token: Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(prefix="/api", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses={code: {"model": ErrorOut} for code in (401, 403)})


class DeletedOut(BaseModel):
    deleted: str


@router.delete("/saes/{sae_id}", response_model=DeletedOut, responses={404: {"model": ErrorOut}},
               summary="Delete an SAE and everything loaded with it (admin token)")
async def delete_sae(sae_id: str, request: Request):
    if not await run_in_threadpool(unload_sae, request.app.state.engine, sae_id):
        raise HTTPException(404, f"no SAE {sae_id!r}")
    return {"deleted": sae_id}
