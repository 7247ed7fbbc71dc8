"""Credentials: service API keys and HS256 user JWTs, both as ``Authorization: Bearer``."""

from __future__ import annotations

import hmac
from uuid import UUID

import jwt

from ourvidz_serve.errors import Unauthorized
from ourvidz_serve.jobs.service import Principal


class Authenticator:
    def __init__(self, api_keys: list[str], jwt_secret: str | None) -> None:
        self._api_keys = [key.encode() for key in api_keys]
        self._jwt_secret = jwt_secret

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("missing Authorization header (expected 'Bearer <key or token>')")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthorized("Authorization must be 'Bearer <key or token>'")
        if any(hmac.compare_digest(credential.encode(), key) for key in self._api_keys):
            return Principal(user_id=None, is_service=True)
        if self._jwt_secret is None or credential.count(".") != 2:
            raise Unauthorized("invalid API key")
        return self._user_from_token(credential, self._jwt_secret)

    @staticmethod
    def _user_from_token(token: str, secret: str) -> Principal:
        try:
            claims = jwt.decode(
                token, secret, algorithms=["HS256"], options={"require": ["sub", "exp"]}
            )
            return Principal(user_id=UUID(str(claims["sub"])), is_service=False)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid user token: {exc}") from exc
        except ValueError as exc:
            raise Unauthorized("user token 'sub' is not a UUID") from exc
