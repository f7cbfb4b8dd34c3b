"""Caller authentication: Nakama session tokens and server-to-server API keys.

Session tokens are HS256 JWTs in Nakama's format: `uid` (user id), `usn`
(username), `exp`, and optionally `tid` (session id) and `vrs` (variables).
API keys are opaque strings, one per line in a Secret-mounted file; only their
SHA-256 digests are kept in memory. Neither the session key nor an API key is
ever logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from eventrouter.errors import AuthError

__all__ = ["Authenticator", "Principal"]

logger = logging.getLogger(__name__)

_TOKEN_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Principal:
    """The caller of a request."""

    user_id: str | None = None
    username: str | None = None
    session_id: str | None = None
    server: bool = False
    """True for API-key callers, who may send `external: false`."""


ANONYMOUS = Principal()
SERVER = Principal(server=True)


class Authenticator:
    """Check the credentials of ingestion requests.

    With neither a session key nor API keys, every request is accepted as
    anonymous; the server allows that only on a loopback address.
    """

    def __init__(self, session_key: str | None, api_keys: list[str]) -> None:
        self._session_key = session_key.encode() if session_key else None
        self._api_key_digests = frozenset(hashlib.sha256(k.encode()).digest() for k in api_keys)
        # token -> (principal, exp); verified tokens skip the HMAC until they expire.
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._session_key is not None or bool(self._api_key_digests)

    @property
    def has_api_keys(self) -> bool:
        return bool(self._api_key_digests)

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """Return the caller for the given headers, or raise `AuthError`."""
        if api_key is not None:
            if self._api_key_digests:
                return self.check_api_key(api_key)
            if self.enabled and authorization is None:
                raise AuthError("this router accepts no API keys: send a session token")
            # Without auth, or beside a session token, the header means nothing.
        if authorization is None:
            if not self.enabled:
                return ANONYMOUS
            raise AuthError(
                "missing credentials: send 'Authorization: Bearer <session token>' "
                "or an 'X-Api-Key' header"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("invalid Authorization header: expected 'Bearer <session token>'")
        if self._session_key is None:
            if not self.enabled:
                return ANONYMOUS
            raise AuthError("session tokens are not accepted by this router: use an API key")
        return self.check_token(token.strip())

    def check_api_key(self, key: str) -> Principal:
        if hashlib.sha256(key.encode()).digest() in self._api_key_digests:
            return SERVER
        raise AuthError("invalid API key")

    def check_token(self, token: str) -> Principal:
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None:
            principal, exp = cached
            if exp > now:
                return principal
            del self._cache[token]
            raise AuthError("session token expired: sign in again for a new token")
        assert self._session_key is not None
        try:
            claims = jwt.decode(
                token,
                self._session_key,
                algorithms=["HS256"],
                options={"require": ["exp", "uid"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("session token expired: sign in again for a new token") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("session token signature is invalid for this router's key") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"session token is missing the {exc.claim!r} claim") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid session token: {exc}") from exc
        for claim in ("uid", "usn", "tid"):
            if claims.get(claim) is not None and not isinstance(claims[claim], str):
                raise AuthError(f"session token claim {claim!r} must be a string")
        principal = Principal(
            user_id=str(claims["uid"]),
            username=str(claims["usn"]) if claims.get("usn") is not None else None,
            session_id=str(claims["tid"]) if claims.get("tid") is not None else None,
        )
        self._cache[token] = (principal, float(claims["exp"]))
        if len(self._cache) > _TOKEN_CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal
