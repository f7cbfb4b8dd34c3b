"""Unit tests of session token and API key checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from types import SimpleNamespace
from typing import Any

import jwt
import pytest

from eventrouter import auth
from eventrouter.auth import Authenticator, Principal
from eventrouter.errors import AuthError

SESSION_KEY = "unit-session-key-0123456789abcdef"
OTHER_KEY = "another-session-key-0123456789abcd"
API_KEY = "server-api-key-0123456789"


def nakama_claims(expires_in: float = 3600, **overrides: Any) -> dict[str, Any]:
    """Return session token claims in Nakama's format; an override of None removes a claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "tid": "7f3c2a9e-2b1d-4a8e-9c55-0d6f1e2a3b4c",
        "uid": "2c8e5b1a-6f7d-4e3c-8a9b-1d2e3f4a5b6c",
        "usn": "player_one",
        "vrs": {"region": "eu"},
        "exp": now + int(expires_in),
        "iat": now,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(claims: dict[str, Any], key: str = SESSION_KEY) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_by_hand(alg: str, claims: dict[str, Any], key: str = SESSION_KEY) -> str:
    """Build a JWT whose header names `alg`.

    HS512 tokens get an HMAC-SHA512 signature, `none` tokens no signature, and
    other algorithms a fake one. PyJWT needs `cryptography` to sign RS256, and
    the router must reject the token on its header alone.
    """
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    if alg == "none":
        signature = ""
    elif alg == "HS512":
        signature = _b64(hmac.new(key.encode(), signing_input, hashlib.sha512).digest())
    else:
        signature = _b64(b"not-a-real-signature")
    return f"{header}.{payload}.{signature}"


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator(SESSION_KEY, [API_KEY])


def bearer(token: str) -> str:
    return f"Bearer {token}"


# --- session tokens ------------------------------------------------------------


def test_valid_token_principal(authenticator: Authenticator) -> None:
    claims = nakama_claims()
    principal = authenticator.authenticate(bearer(sign(claims)), None)
    assert principal.user_id == claims["uid"]
    assert principal.username == "player_one"
    assert principal.session_id == claims["tid"]
    assert principal.server is False


def test_token_without_usn_and_tid(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate(bearer(sign(nakama_claims(usn=None, tid=None))), None)
    assert principal.user_id is not None
    assert principal.username is None
    assert principal.session_id is None


def test_bearer_scheme_case_insensitive(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate(f"bearer {sign(nakama_claims())}", None)
    assert principal.user_id is not None


@pytest.mark.parametrize(
    ("make_token", "message"),
    [
        (lambda: sign(nakama_claims(expires_in=-60)), "session token expired"),
        (lambda: sign(nakama_claims(), key=OTHER_KEY), "signature is invalid"),
        (lambda: sign_by_hand("none", nakama_claims()), "alg value is not allowed"),
        (lambda: sign_by_hand("HS512", nakama_claims()), "alg value is not allowed"),
        (lambda: sign_by_hand("RS256", nakama_claims()), "alg value is not allowed"),
        (lambda: sign(nakama_claims(uid=None)), "missing the 'uid' claim"),
        (lambda: sign(nakama_claims(exp=None)), "missing the 'exp' claim"),
        (lambda: sign(nakama_claims(exp="tomorrow")), "invalid session token"),
        (lambda: "abc.def.ghi", "invalid session token"),
        (lambda: "not-a-jwt", "invalid session token"),
    ],
    ids=[
        "expired",
        "wrong-key",
        "alg-none",
        "alg-hs512",
        "alg-rs256",
        "missing-uid",
        "missing-exp",
        "exp-not-number",
        "garbage",
        "one-segment",
    ],
)
def test_token_rejected(authenticator: Authenticator, make_token: Any, message: str) -> None:
    token = make_token()
    with pytest.raises(AuthError) as info:
        authenticator.authenticate(bearer(token), None)
    text = str(info.value)
    assert message in text
    assert SESSION_KEY not in text
    assert token not in text
    for segment in token.split("."):
        if len(segment) >= 8:
            assert segment not in text


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Token abc", "Bearer", "Bearer ", "", "abc"],
    ids=["basic", "other-scheme", "bearer-only", "bearer-empty", "empty", "no-scheme"],
)
def test_malformed_header_rejected(authenticator: Authenticator, header: str) -> None:
    with pytest.raises(AuthError, match="invalid Authorization header"):
        authenticator.authenticate(header, None)


def test_missing_credentials_rejected(authenticator: Authenticator) -> None:
    with pytest.raises(AuthError, match="missing credentials"):
        authenticator.authenticate(None, None)


# --- no authentication configured ---------------------------------------------


def test_no_auth_is_anonymous() -> None:
    authenticator = Authenticator(None, [])
    assert authenticator.enabled is False
    assert authenticator.authenticate(None, None) == Principal()


def test_no_auth_ignores_bearer_token() -> None:
    authenticator = Authenticator(None, [])
    principal = authenticator.authenticate(bearer(sign(nakama_claims())), None)
    assert principal == Principal()


def test_empty_session_key_is_unset() -> None:
    authenticator = Authenticator("", [])
    assert authenticator.enabled is False


# --- API keys ------------------------------------------------------------------


def test_api_key_valid(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate(None, API_KEY)
    assert principal.server is True
    assert principal.user_id is None


def test_api_key_wins_over_token(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate(bearer(sign(nakama_claims())), API_KEY)
    assert principal.server is True


@pytest.mark.parametrize("key", ["wrong-key", "", API_KEY + " ", API_KEY.upper()])
def test_api_key_invalid(authenticator: Authenticator, key: str) -> None:
    with pytest.raises(AuthError, match="invalid API key") as info:
        authenticator.authenticate(None, key)
    text = str(info.value)
    assert API_KEY not in text
    if key:
        assert key not in text


def test_api_keys_only_rejects_tokens() -> None:
    authenticator = Authenticator(None, [API_KEY])
    assert authenticator.enabled is True
    assert authenticator.has_api_keys is True
    with pytest.raises(AuthError, match="session tokens are not accepted"):
        authenticator.authenticate(bearer(sign(nakama_claims())), None)


def test_api_keys_only_accepts_key() -> None:
    authenticator = Authenticator(None, [API_KEY, "second-key"])
    assert authenticator.authenticate(None, "second-key").server is True


def test_session_key_only_rejects_api_key() -> None:
    authenticator = Authenticator(SESSION_KEY, [])
    assert authenticator.has_api_keys is False
    with pytest.raises(AuthError, match="accepts no API keys"):
        authenticator.authenticate(None, API_KEY)


# --- token cache ---------------------------------------------------------------


def test_cache_returns_same_principal(authenticator: Authenticator) -> None:
    token = sign(nakama_claims())
    first = authenticator.authenticate(bearer(token), None)
    second = authenticator.authenticate(bearer(token), None)
    assert second is first


def test_cache_skips_verification(
    authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = sign(nakama_claims())
    first = authenticator.authenticate(bearer(token), None)

    def fail_decode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached token was decoded again")

    monkeypatch.setattr(jwt, "decode", fail_decode)
    assert authenticator.authenticate(bearer(token), None) is first


@pytest.mark.parametrize("after_exp", [0.0, 1.0, 3600.0])
def test_cache_rejects_after_expiry(
    authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch, after_exp: float
) -> None:
    claims = nakama_claims(expires_in=5)
    token = sign(claims)
    assert authenticator.authenticate(bearer(token), None).user_id == claims["uid"]

    # Only the module's clock moves, so the rejection can only come from the cache.
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: claims["exp"] + after_exp))
    with pytest.raises(AuthError, match="session token expired") as info:
        authenticator.authenticate(bearer(token), None)
    assert token not in str(info.value)


def test_cache_accepts_before_expiry(
    authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims = nakama_claims(expires_in=5)
    token = sign(claims)
    first = authenticator.authenticate(bearer(token), None)
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: claims["exp"] - 0.001))
    assert authenticator.authenticate(bearer(token), None) is first


def test_cache_is_bounded(authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_TOKEN_CACHE_SIZE", 3)
    tokens = [sign(nakama_claims(uid=f"user-{i}")) for i in range(5)]
    for token in tokens:
        authenticator.authenticate(bearer(token), None)
    assert list(authenticator._cache) == tokens[2:]
