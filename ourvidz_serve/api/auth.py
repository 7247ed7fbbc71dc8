"""Credentials: service API keys and HS256 user JWTs, both as ``Authorization: Bearer``.

Keys are compared in constant time, every key every time, and are never logged or echoed; a
caller is known afterwards by :func:`key_id`, a short hash of its key.
"""

from __future__ import annotations

import hashlib
import hmac
from uuid import UUID

import jwt

from ourvidz_serve.catalog import Tier
from ourvidz_serve.errors import Unauthorized
from ourvidz_serve.jobs.principal import Principal

JWT_ALGORITHM = "HS256"
JWT_LEEWAY_S = 10
"""Clock skew tolerated on ``exp``/``nbf``/``iat`` between the platform and this service."""


def key_id(api_key: str) -> str:
    """A stable, non-reversible name for an API key (for rate limits and logs)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, api_keys: list[str], jwt_secret: str | None) -> None:
        self._api_keys = [(key.encode(), key_id(key)) for key in api_keys]
        self._jwt_secret = jwt_secret

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("missing Authorization header (expected 'Bearer <key or token>')")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthorized("Authorization must be 'Bearer <key or token>'")
        presented = credential.encode("utf-8", "replace")
        matched: str | None = None
        # No early exit: the time taken does not tell how many keys were tried.
        for key, identifier in self._api_keys:
            if hmac.compare_digest(presented, key):
                matched = identifier
        if matched is not None:
            return Principal(user_id=None, is_service=True, key_id=matched)
        if self._jwt_secret is None or credential.count(".") != 2:
            raise Unauthorized("invalid API key")
        return self._user_from_token(credential, self._jwt_secret)

    @staticmethod
    def _user_from_token(token: str, secret: str) -> Principal:
        try:
            # The algorithm is pinned: "none", RS256 with the secret as a public key, and any
            # other header value are refused by PyJWT before the signature is looked at.
            claims = jwt.decode(
                token,
                secret,
                algorithms=[JWT_ALGORITHM],
                leeway=JWT_LEEWAY_S,
                options={"require": ["sub", "exp"]},
            )
            user_id = UUID(str(claims["sub"]))
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid user token: {exc}") from exc
        except ValueError as exc:
            raise Unauthorized("user token 'sub' is not a UUID") from exc
        tier = claims.get("tier")
        if tier is not None and tier not in set(Tier):
            raise Unauthorized(f"user token 'tier' must be one of {', '.join(Tier)}")
        return Principal(
            user_id=user_id, is_service=False, tier=Tier(tier) if tier is not None else None
        )
