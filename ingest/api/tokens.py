"""TokenService: an admin token manages the tokens of its own workspace.

The auth interceptor has checked the caller is an admin and that the
request's workspace is the caller's (an empty one was filled in), before
any of this runs. With auth off there is no caller to scope by, so the
service refuses (tokens are then made with `steplog-ingest token create`).
"""

from __future__ import annotations

from typing import Any

import grpc

from ingest.api import auth
from ingest.api.common import handle_errors, timestamp
from ingest.core.errors import ApiError, invalid
from ingest.store import tokens
from steplog.v1 import token_service_pb2 as pb
from steplog.v1 import token_service_pb2_grpc as pb_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]

ROLE_TO_PROTO = {
    tokens.Role.READER: pb.TOKEN_ROLE_READER,
    tokens.Role.WRITER: pb.TOKEN_ROLE_WRITER,
    tokens.Role.ADMIN: pb.TOKEN_ROLE_ADMIN,
}
PROTO_TO_ROLE = {v: k for k, v in ROLE_TO_PROTO.items()}


def token_to_proto(row: tokens.TokenRow) -> pb.TokenInfo:
    return pb.TokenInfo(
        token_id=row.token_id,
        name=row.name,
        workspace=row.workspace,
        role=ROLE_TO_PROTO[row.role],
        created_time=timestamp(row.created_at),
        expire_time=timestamp(row.expires_at),
        last_used_time=timestamp(row.last_used_at),
        revoke_time=timestamp(row.revoked_at),
    )


def _caller() -> auth.Principal:
    principal = auth.current_principal()
    if principal is None:
        raise ApiError(
            "FAILED_PRECONDITION",
            "token management needs the service to run with --auth token;"
            " with auth off, create tokens with `steplog-ingest token create`",
        )
    return principal


class TokenServicer(pb_grpc.TokenServiceServicer):
    def __init__(
        self, store: tokens.TokenStore, verifier: auth.TokenVerifier, audit: auth.Audit
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.audit = audit

    @handle_errors
    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: Ctx
    ) -> pb.CreateTokenResponse:
        caller = _caller()
        role = PROTO_TO_ROLE.get(request.role)
        if role is None:
            raise invalid("role", "role is required: READER, WRITER or ADMIN")
        seconds: float | None = None
        if request.HasField("expires_in"):
            seconds = request.expires_in.ToTimedelta().total_seconds()
            if seconds <= 0:
                raise invalid("expires_in", "expires_in must be positive (or unset: never)")
        row, text = await self.store.create(
            caller.workspace, role, request.name, seconds, created_by=caller.token_id
        )
        self.audit.created(row, f"token {caller.token_id}", context.peer())
        return pb.CreateTokenResponse(info=token_to_proto(row), token=text)

    @handle_errors
    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Ctx
    ) -> pb.ListTokensResponse:
        caller = _caller()
        rows = await self.store.list(caller.workspace, request.include_revoked)
        return pb.ListTokensResponse(tokens=[token_to_proto(r) for r in rows])

    @handle_errors
    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Ctx
    ) -> pb.RevokeTokenResponse:
        caller = _caller()
        row, revoked = await self.store.revoke(request.token_id, caller.workspace)
        if revoked:
            self.verifier.forget(row.token_id)
            self.audit.revoked(row, f"token {caller.token_id}", context.peer())
        return pb.RevokeTokenResponse(token=token_to_proto(row))
