"""Everything that reads, injects, recognises or redacts a secret.

This is the only module that looks inside credentials: the rest of the proxy sees a
`Secret` (whose repr and str never show the value) and key fingerprints.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NewType
from urllib.parse import quote, unquote

from multidict import MutableMultiMapping
from yarl import URL

from proxy.errors import BadRequest

API_KEY_PARAM = "api_key"
_ACCESS_TOKEN_PARAM = "access_token"
_PARAM_NAMES_TO_STRIP = frozenset({API_KEY_PARAM})
REDACTED = "***"
NO_KEY = "(none)"
V3_SHARED_BUCKET = "(v3-shared)"


class Secret:
    """A credential that prints as ``***`` everywhere; `reveal()` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register_secret(value)

    def reveal(self) -> str:
        """The raw value, for putting on the wire and nowhere else."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and _same(other._value, self._value)

    def __hash__(self) -> int:
        return hash(self._value)


class SecretURL:
    """A URL whose user and password are secrets (an egress proxy's): they print as ``***``."""

    __slots__ = ("_url",)

    def __init__(self, url: URL) -> None:
        self._url = url
        for part in (url.user, url.password, url.raw_user, url.raw_password):
            if part:
                register_secret(part)

    def reveal(self) -> URL:
        """The URL with its credentials, for putting on the wire and nowhere else."""
        return self._url

    @property
    def address(self) -> URL:
        """The URL without credentials."""
        return self._url.with_user(None)

    @property
    def user(self) -> str | None:
        """The user name, if the URL has one (a secret too)."""
        return self._url.user

    @property
    def password(self) -> str | None:
        """The password, if the URL has one."""
        return self._url.password

    def __str__(self) -> str:
        url = self._url
        if url.user is None and url.password is None:
            return str(url)
        shown = url.with_user(REDACTED)
        return str(shown.with_password(REDACTED) if url.password is not None else shown)

    def __repr__(self) -> str:
        return f"SecretURL({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretURL) and _same(str(other._url), str(self._url))

    def __hash__(self) -> int:
        return hash(str(self._url))


class ClientToken(Secret):
    """A client token and the name its client is shown under (never the token itself)."""

    __slots__ = ("name",)

    def __init__(self, value: str, name: str | None = None) -> None:
        super().__init__(value)
        self.name = name or client_token_label(value)


def client_token_label(value: str) -> str:
    """The name an unnamed client token is shown under: `token-` and a short fingerprint."""
    return "token-" + fingerprint(value)[:8]


# Every secret the process has been told about, so that `redact` can scrub text it did not
# produce (exception messages, upstream error text). Process-wide on purpose: a log line
# written anywhere must be clean, whichever app instance holds the secret. Kept longest
# first, so that a secret containing another is replaced whole rather than in part, and
# replaced (never mutated) so that a thread logging meanwhile iterates a complete tuple.
_KNOWN_SECRETS: tuple[str, ...] = ()
_SECRET_PATTERN: list[re.Pattern[str]] = [
    re.compile(
        r"(?i)((?:api_key|access_token|refresh_token|client_secret|code_verifier|code)=)[^&\s\"']+"
    ),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9\-._~+/=]+"),
    re.compile(r"(?i)(basic\s+)[A-Za-z0-9+/=]+"),
    # user:password@ in a URL (an egress proxy's, as HTTPS_PROXY carries it)
    re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^/@\s:]*:)[^/@\s]+(?=@)"),
]
# Every pattern needs an "=", an "@" or one of these words: text with none skips the patterns.
_SCHEME_WORD = re.compile(r"(?i)bearer|basic")
# Shorter values are not scrubbed by value (they would blank out ordinary words); the
# patterns above still catch them where they appear as credentials.
_MIN_SCRUBBED = 4


def register_secret(value: str) -> None:
    """Remember a secret (and its percent-encoded form) for `redact` to remove from any text."""
    global _KNOWN_SECRETS
    forms = {form for form in (value, quote(value, safe="")) if len(form) >= _MIN_SCRUBBED}
    if not forms.issubset(_KNOWN_SECRETS):
        _KNOWN_SECRETS = tuple(sorted({*_KNOWN_SECRETS, *forms}, key=len, reverse=True))


def _keep_name(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def redact(text: str) -> str:
    """Remove every known secret and every credential-looking parameter from text.

    The one redaction function: log lines, reprs, /status and error text all go through it.
    """
    for secret in _KNOWN_SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "=" in text or "@" in text or _SCHEME_WORD.search(text):
        for pattern in _SECRET_PATTERN:
            text = pattern.sub(_keep_name, text)
    return text


def _lowered_decoded(raw_query: str) -> str:
    """A cheap superset test for parameter names: the query decoded once, lower-cased."""
    return unquote(raw_query).lower() if "%" in raw_query else raw_query.lower()


def _wire(value: str) -> bytes:
    # surrogatepass: header values arrive decoded with surrogateescape; never raise here.
    return value.encode("utf-8", "surrogatepass")


def _same(a: str, b: str) -> bool:
    """Compare two secrets in time that does not depend on where they differ."""
    return hmac.compare_digest(_wire(a), _wire(b))


Fingerprint = NewType("Fingerprint", str)
"""A key's short stable name (12 hex digits of its SHA-256): what queues, backends, Redis,
logs and pages use. A raw key is a plain `str`, so mypy refuses one where this belongs."""


@functools.lru_cache(maxsize=1024)
def fingerprint(key: str) -> Fingerprint:
    """A short stable name for a key, safe to log, export and store."""
    if key in (NO_KEY, V3_SHARED_BUCKET):
        return Fingerprint(key)
    # The same 12 hex digits the simulator shows, so both sides' stats line up.
    return Fingerprint(hashlib.sha256(key.encode()).hexdigest()[:12])


# A JWT payload longer than this is not one of ours to read (Constant Contact's are < 1 KiB).
MAX_JWT_PAYLOAD = 8 * 1024


def jwt_client_id(token: str) -> str | None:
    """The `cid` / `client_id` claim of a JWT, read without verifying (it only names a bucket).

    Constant Contact counts v3 quota per application, and its access tokens name the
    application's client id in `cid`. Anything that is not a small JSON object (too long,
    not base64, nested past the parser's depth) is no JWT: None, never an exception.
    """
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > MAX_JWT_PAYLOAD:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, RecursionError):
        # binascii.Error, UnicodeDecodeError and JSONDecodeError are all ValueErrors.
        return None
    if not isinstance(claims, dict):
        return None
    for claim in ("cid", "client_id"):
        value = claims.get(claim)
        if isinstance(value, str) and value:
            return value
    return None


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` value, or None."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _param_name(piece: str) -> str:
    return unquote(piece.partition("=")[0].replace("+", " "))


def _param_value(piece: str) -> str:
    return unquote(piece.partition("=")[2].replace("+", " "))


def query_param_values(raw_query: str, name: str) -> list[str]:
    """The decoded values of one parameter in a raw query string, in order."""
    values = []
    for piece in raw_query.split("&"):
        if piece and _param_name(piece) == name:
            values.append(_param_value(piece))
    return values


# Some servers also split a query at ";" (the HTML 4 recommendation, Java servlet
# containers, Python before 3.9.2): wherever credentials are looked for or taken out, both
# separators count, so that "x=1;api_key=K" cannot carry a key past the proxy.
_SEPARATED = re.compile(r"([&;])")


def _pieces(raw_query: str) -> list[tuple[str, str]]:
    """(separator before, piece) for every non-empty piece of a raw query, split at & and ;."""
    parts = _SEPARATED.split(raw_query)
    pieces = [("", parts[0])] if parts[0] else []
    pieces.extend((parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2) if parts[i + 1])
    return pieces


def _join(pieces: Iterable[tuple[str, str]]) -> str:
    out: list[str] = []
    for separator, piece in pieces:
        if out:
            out.append(separator)
        out.append(piece)
    return "".join(out)


def strip_params(raw_query: str, names: Iterable[str]) -> str:
    """The raw query without the named parameters (names percent-decoded, split at & and ;).

    Every other piece is kept byte for byte, with the separator that preceded it.
    """
    drop = frozenset(names)
    return _join((sep, p) for sep, p in _pieces(raw_query) if _param_name(p) not in drop)


def api_key_values(raw_query: str) -> list[str]:
    """Every `api_key` a raw query carries, however written: names and values percent-decoded,
    pieces split at & and ; (``api%5Fkey=K`` and ``x=1;api_key=K`` are api_keys too)."""
    return [_param_value(p) for _, p in _pieces(raw_query) if _param_name(p) == API_KEY_PARAM]


@dataclass(frozen=True, slots=True)
class Outbound:
    """The credentials a request leaves with, and the quota bucket they fall in."""

    raw_query: str
    authorization: str | None
    quota_key: str


class Injector:
    """Replaces the client's credentials with the configured ones (never appends).

    Client tokens (``--client-token``) are what a client shows the proxy, in the places its
    SDK already sends a credential: the v2 ``api_key`` parameter, ``Authorization: Bearer``,
    or ``Proxy-Authorization: Bearer``. They are checked in `admits` and never leave the proxy.
    """

    __slots__ = ("_api_key", "_api_key_param", "_client_names", "_client_tokens", "_lowered_tokens")

    def __init__(self, api_key: Secret | None, client_tokens: Iterable[Secret] = ()) -> None:
        self._api_key = api_key.reveal() if api_key else None
        self._api_key_param = (
            f"{API_KEY_PARAM}={quote(self._api_key, safe='')}" if self._api_key else None
        )
        tokens = tuple(client_tokens)
        self._client_tokens = tuple(_wire(t.reveal()) for t in tokens)
        self._client_names = tuple(
            t.name if isinstance(t, ClientToken) else client_token_label(t.reveal()) for t in tokens
        )
        self._lowered_tokens = tuple(t.reveal().lower() for t in tokens)

    def is_client_token(self, value: str | None) -> bool:
        """Whether a presented value is one of the client tokens (constant-time comparison)."""
        return self._token_name(value) is not None

    def _token_name(self, value: str | None) -> str | None:
        if not value or not self._client_tokens:
            return None
        given = _wire(value)
        found = None
        # Every token is compared, so the time taken says nothing about which one was close.
        for token, name in zip(self._client_tokens, self._client_names, strict=True):
            if hmac.compare_digest(given, token):
                found = name
        return found

    def outbound(
        self,
        generation: str,
        raw_query: str,
        client_authorization: str | None,
        token: str | None,
    ) -> Outbound:
        """Work out the query, Authorization and quota key a request is sent with.

        With a configured key every client `api_key` goes and exactly one configured one is
        added (v2); with a configured token `Authorization` is replaced and every client
        `access_token` parameter goes. Without configured credentials the client's own pass
        through; a client token never does, in any parameter, in any encoding, nor in
        `Authorization` under any scheme. Raises BadRequest when the client's own api_keys
        (pass-through mode) name two different keys.
        """
        query = raw_query
        if self._client_tokens and query:
            query = self._without_client_tokens(query)
        if token is not None and _ACCESS_TOKEN_PARAM in _lowered_decoded(query):
            query = strip_params(query, (_ACCESS_TOKEN_PARAM,))
        if generation == "v2" and self._api_key_param is not None:
            stripped = strip_params(query, _PARAM_NAMES_TO_STRIP)
            query = f"{stripped}&{self._api_key_param}" if stripped else self._api_key_param

        if token is not None:
            authorization: str | None = f"Bearer {token}"
        elif client_authorization is not None and self.carries_client_token(client_authorization):
            authorization = None
        else:
            authorization = client_authorization
        return Outbound(query, authorization, self._quota_key(generation, query, authorization))

    def carries_client_token(self, text: str) -> bool:
        """Whether text holds a client token in any form: as sent, percent-decoded (once or
        twice), in any case. For what leaves the proxy, never for admission."""
        if not self._client_tokens:
            return False
        forms = {text.lower()}
        if "%" in text or "+" in text:
            once = unquote(text.replace("+", " "))
            forms.update((once.lower(), unquote(once).lower()))
        return any(token in form for token in self._lowered_tokens for form in forms)

    def drop_client_tokens(self, headers: MutableMultiMapping[str]) -> None:
        """Remove every header field whose name or value carries a client token (any form)."""
        if not self._client_tokens:
            return
        carrying = {
            name
            for name, value in headers.items()
            if self.carries_client_token(value) or self.carries_client_token(name)
        }
        for name in carrying:
            headers.popall(name, None)

    def _without_client_tokens(self, raw_query: str) -> str:
        if not self.carries_client_token(raw_query):
            return raw_query  # untouched queries keep every byte
        query = _join((sep, p) for sep, p in _pieces(raw_query) if not self.carries_client_token(p))
        if self.carries_client_token(query):
            # Only a token that itself holds "&" or ";" can span pieces; it goes nowhere.
            raise BadRequest("The request's query string cannot be forwarded as it is.")
        return query

    def _quota_key(self, generation: str, query: str, authorization: str | None) -> str:
        if self._api_key is not None:
            return self._api_key
        if generation == "v2":
            keys = set(api_key_values(query)) if API_KEY_PARAM in _lowered_decoded(query) else ()
            if len(keys) > 1:
                # The upstream would pick one, the proxy might queue under the other: refuse
                # rather than let one request be paced under a key it is not sent with.
                raise BadRequest("The request carries more than one api_key; send exactly one.")
            return next(iter(keys), NO_KEY)
        token = bearer_token(authorization)
        client_id = jwt_client_id(token) if token else None
        return client_id or V3_SHARED_BUCKET

    def admits(
        self, raw_query: str, authorization: str | None, proxy_authorization: str | None
    ) -> bool:
        """Whether the request carries a client token (always true when none are configured)."""
        if not self._client_tokens:
            return True
        return self.client_of(raw_query, authorization, proxy_authorization) is not None

    def client_of(
        self, raw_query: str, authorization: str | None, proxy_authorization: str | None
    ) -> str | None:
        """The name of the client token the request carries (None: none, or none configured)."""
        if not self._client_tokens:
            return None
        candidates = [bearer_token(authorization), bearer_token(proxy_authorization)]
        candidates.extend(query_param_values(raw_query, API_KEY_PARAM))
        found = None
        for candidate in candidates:
            name = self._token_name(candidate)
            found = found or name
        return found


class TokenSource:
    """Where the access token to inject comes from: here a fixed one (or none).

    The OAuth refresher subclasses this; the request path only calls these methods.
    """

    def __init__(self, token: Secret | None) -> None:
        self._token = token

    @property
    def ready(self) -> bool:
        """Whether the proxy's own credentials are usable."""
        return True

    def status(self) -> dict[str, object]:
        """What the dashboard shows of this source: its kind, never the token."""
        return {"kind": "fixed" if self._token else "pass-through", "ready": True}

    async def current(self) -> str | None:
        """The token to send now, or None to pass the client's through."""
        return self._token.reveal() if self._token else None

    async def refresh_after_401(self, rejected: str) -> str | None:
        """A fresh token after the upstream refused `rejected`, or None if there is none."""
        return None
