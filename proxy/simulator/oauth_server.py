"""The simulator's authorization server: authorize, token (refresh and code grants, PKCE)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from proxy.simulator.config import (
    _CODE_TTL,
    _OFFLINE_ACCESS,
    _TOKEN_HISTORY,
    TOKEN_ENDPOINT_QPS,
    SimulatorConfig,
)
from proxy.simulator.windows import RollingWindow


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


@dataclass(slots=True)
class _Grant:
    """What a refresh token stands for."""

    client_id: str
    scope: str


@dataclass(slots=True)
class _Code:
    """An authorization code waiting to be exchanged (once)."""

    client_id: str
    redirect_uri: str
    challenge: str | None
    scope: str
    expires: float


class OAuthServer:
    """The authorization server's part: an authorize endpoint that approves at once, a token
    endpoint (refresh and authorization-code grants, PKCE S256), expiring JWT-shaped access
    tokens and, when configured, rotating refresh tokens. Limited to 1 call/s like the real one.
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        assert config.oauth_client_id is not None
        self.client_id = config.oauth_client_id
        self.config = config
        self._clock = clock
        self._wall_clock = wall_clock
        self._access: dict[str, float] = {}  # access token -> clock time it expires
        self._refresh: dict[str, _Grant] = {}
        self._codes: dict[str, _Code] = {}
        self._window = RollingWindow(TOKEN_ENDPOINT_QPS)
        # The latest tokens it handed out, so tests can look for them where they must not be.
        self._handed_out: deque[str] = deque(maxlen=_TOKEN_HISTORY)
        if config.oauth_refresh_token is not None:
            self._refresh[config.oauth_refresh_token] = _Grant(
                self.client_id, f"contact_data {_OFFLINE_ACCESS}"
            )
        self.reset_counters()

    def reset_counters(self) -> None:
        """Forget what the endpoints saw (issued tokens stay valid)."""
        self.token_calls = 0
        self.authorize_calls = 0
        self.issued = 0
        self.rotated = 0
        self.errors: dict[str, int] = {}

    def issued_tokens(self) -> list[str]:
        """The latest access and refresh tokens it issued (bounded), for leak checks."""
        return list(self._handed_out)

    def access_ok(self, token: str) -> bool:
        """Whether `token` is an access token this server issued that has not expired."""
        expires = self._access.get(token)
        return expires is not None and self._clock() < expires

    def expire_access_tokens(self) -> int:
        """End every issued access token now (as a revocation or an early expiry would)."""
        count = len(self._access)
        self._access.clear()
        return count

    def revoke_refresh_tokens(self) -> int:
        """Forget every refresh token: the next refresh with any of them is `invalid_grant`."""
        count = len(self._refresh)
        self._refresh.clear()
        return count

    def stats(self) -> dict[str, object]:
        """What the authorization server saw; never a token."""
        now = self._clock()
        return {
            "token_calls": self.token_calls,
            "authorize_calls": self.authorize_calls,
            "issued": self.issued,
            "rotated": self.rotated,
            "errors": dict(self.errors),
            "live_access_tokens": sum(1 for t in self._access.values() if t > now),
            "rotate_refresh_tokens": self.config.rotate_refresh_tokens,
            "token_ttl": self.config.token_ttl,
        }

    def _fail(self, status: int, error: str, description: str) -> web.Response:
        self.errors[error] = self.errors.get(error, 0) + 1
        return _oauth_error(status, error, description)

    def _mint_access(self, scope: str) -> str:
        now = self._wall_clock()
        ttl = self.config.token_ttl
        header = {"kid": "simulator", "alg": "RS256"}
        claims = {
            "ver": 1,
            "jti": "AT." + secrets.token_urlsafe(16),
            "iss": "simulator/oauth2/default",
            "aud": "https://api.cc.email",
            "iat": int(now),
            "exp": int(now + ttl),
            "cid": self.client_id,
            "uid": "simulator-user",
            "scp": scope.split(),
        }
        token = ".".join(
            (
                _b64url(json.dumps(header).encode()),
                _b64url(json.dumps(claims).encode()),
                _b64url(secrets.token_bytes(32)),
            )
        )
        clock = self._clock()
        self._access = {t: e for t, e in self._access.items() if e > clock}
        self._access[token] = clock + ttl
        self._handed_out.append(token)
        self.issued += 1
        return token

    def _issue(self, scope: str, refresh_token: str | None) -> web.Response:
        ttl = self.config.token_ttl
        body: dict[str, object] = {
            "token_type": "Bearer",
            "expires_in": int(ttl) if float(ttl).is_integer() else ttl,
            "access_token": self._mint_access(scope),
            "scope": scope,
        }
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
            self._handed_out.append(refresh_token)
        # RFC 6749 §5.1: token answers must not be cached.
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _client(self, request: web.Request, form: Mapping[str, str]) -> str | web.Response:
        """The authenticated client id, or the error answer (Basic, or client_id in the form)."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, encoded = header.strip().partition(" ")
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode()
            except ValueError:
                decoded = ""
            if scheme.lower() != "basic" or ":" not in decoded:
                return self._fail(401, "invalid_client", "Client authentication failed.")
            client_id, _, secret = decoded.partition(":")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        expected = self.config.oauth_client_secret
        if client_id != self.client_id or (
            not secrets.compare_digest(secret, expected) if expected is not None else bool(secret)
        ):
            # A public (PKCE) client has no secret: presenting one is as wrong as a bad one.
            return self._fail(401, "invalid_client", "Client authentication failed.")
        return client_id

    async def handle_token(self, request: web.Request) -> web.StreamResponse:
        """POST the token endpoint: `refresh_token` and `authorization_code` grants."""
        self.token_calls += 1
        if not self._window.take(self._clock()):
            self.errors["rate_limited"] = self.errors.get("rate_limited", 0) + 1
            reset = math.ceil(self._wall_clock() + 1)
            return web.json_response(
                {
                    "errorCode": "E0000047",
                    "errorSummary": "API call exceeded rate limit due to too many requests.",
                },
                status=429,
                headers={
                    "X-Rate-Limit-Limit": str(TOKEN_ENDPOINT_QPS),
                    "X-Rate-Limit-Remaining": "0",
                    "X-Rate-Limit-Reset": str(reset),
                },
            )
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        client = self._client(request, fields)
        if isinstance(client, web.Response):
            return client
        grant_type = fields.get("grant_type")
        if grant_type == "refresh_token":
            return self._refresh_grant(client, fields)
        if grant_type == "authorization_code":
            return self._code_grant(client, fields)
        return self._fail(400, "unsupported_grant_type", "The grant type is not supported.")

    def _refresh_grant(self, client: str, form: Mapping[str, str]) -> web.Response:
        presented = form.get("refresh_token", "")
        grant = self._refresh.get(presented)
        if grant is None or grant.client_id != client:
            return self._fail(400, "invalid_grant", "The refresh token is invalid or expired.")
        refresh_token = presented
        if self.config.rotate_refresh_tokens:
            del self._refresh[presented]
            refresh_token = "RT." + secrets.token_urlsafe(32)
            self._refresh[refresh_token] = grant
            self.rotated += 1
        return self._issue(grant.scope, refresh_token)

    def _code_grant(self, client: str, form: Mapping[str, str]) -> web.Response:
        code = self._codes.pop(form.get("code", ""), None)
        if (
            code is None
            or code.expires <= self._clock()
            or code.client_id != client
            or code.redirect_uri != form.get("redirect_uri")
        ):
            return self._fail(400, "invalid_grant", "The authorization code is invalid or expired.")
        if code.challenge is not None:
            verifier = form.get("code_verifier", "")
            computed = _b64url(hashlib.sha256(verifier.encode()).digest())
            if not verifier or not secrets.compare_digest(computed, code.challenge):
                return self._fail(
                    400, "invalid_grant", "PKCE verification failed for code challenge method S256."
                )
        refresh_token = None
        if _OFFLINE_ACCESS in code.scope.split():
            refresh_token = "RT." + secrets.token_urlsafe(32)
            self._refresh[refresh_token] = _Grant(client, code.scope)
        return self._issue(code.scope, refresh_token)

    async def handle_authorize(self, request: web.Request) -> web.StreamResponse:
        """GET the authorize endpoint: the user approves at once (302 to redirect_uri)."""
        self.authorize_calls += 1
        query = request.query
        redirect_uri = query.get("redirect_uri", "")
        target = URL(redirect_uri)
        if query.get("client_id") != self.client_id or target.scheme not in ("http", "https"):
            # Like the real server: no redirect to an unverified place, an error page instead.
            self.errors["invalid_client"] = self.errors.get("invalid_client", 0) + 1
            return web.Response(status=400, text="Unknown client_id or bad redirect_uri.\n")
        reply: dict[str, str] = {}
        if "state" in query:
            reply["state"] = query["state"]
        challenge = query.get("code_challenge")
        if query.get("response_type") != "code":
            reply["error"] = "unsupported_response_type"
        elif challenge is not None and query.get("code_challenge_method") != "S256":
            reply["error"] = "invalid_request"
        elif challenge is None and self.config.oauth_client_secret is None:
            reply["error"] = "invalid_request"  # public clients must use PKCE
        else:
            code = secrets.token_urlsafe(24)
            self._codes[code] = _Code(
                self.client_id,
                redirect_uri,
                challenge,
                query.get("scope", ""),
                self._clock() + _CODE_TTL,
            )
            reply["code"] = code
        if "error" in reply:
            self.errors[reply["error"]] = self.errors.get(reply["error"], 0) + 1
        raise web.HTTPFound(target.update_query(reply))

    async def handle_expire(self, request: web.Request) -> web.StreamResponse:
        """POST `/__sim__/oauth/expire`: every issued access token stops working now."""
        return web.json_response({"expired": self.expire_access_tokens()})

    async def handle_revoke(self, request: web.Request) -> web.StreamResponse:
        """POST `/__sim__/oauth/revoke`: forget every refresh token and end every access token."""
        revoked = self.revoke_refresh_tokens()
        self.expire_access_tokens()
        return web.json_response({"revoked": revoked})
