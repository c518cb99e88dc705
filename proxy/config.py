"""The proxy's configuration: each setting declared once, on the frozen `Config` value.

A field declared with `setting(default, env, parser, help)` is a setting: its flag is its
name (`--max-wait`), its environment twin `env`; flags win over the environment, the
environment over the field's default. `SETTINGS` (derived from the fields) feeds the
argument parser, the environment reading, `login`'s shared flags and the README's table.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from yarl import URL

from proxy.credentials import ClientToken, Secret, SecretURL

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_UPSTREAM_V2 = "https://api.constantcontact.com"
DEFAULT_UPSTREAM_V3 = "https://api.cc.email"
DEFAULT_TOKEN_URL = "https://authz.constantcontact.com/oauth2/default/v1/token"
DEFAULT_QPS = 4.0
DEFAULT_DAILY_QUOTA = 10_000
DEFAULT_MAX_WAIT = 30.0
DEFAULT_MAX_QUEUE = 10_000
# Arrivals at the gateway can bunch up by the spread of network latency; spacing sends
# (1 s + margin) / qps apart keeps any one-second span at or under qps arrivals when that
# spread is below the margin. 25 ms absorbs the benchmark's 20 ms jitter plus local noise
# (bench/quota.py measured 0 rejections at 97.5% utilisation with it).
DEFAULT_PACING_MARGIN = 0.025
DEFAULT_MAX_BODY = 8 * 1024 * 1024
# Request bodies held at once, all requests together (edge/limits.py): eight bodies of the
# largest size, or thousands of ordinary API calls' JSON, and a bound a container's memory
# limit can be set from.
DEFAULT_MAX_BODY_MEMORY = 64 * 1024 * 1024
# A request body gets this long, plus a second per 16 KiB received (see exchange.read_body).
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_UPSTREAM_TIMEOUT = 60.0
DEFAULT_SHUTDOWN_GRACE = 25.0
DEFAULT_REPLICAS = 1
DEFAULT_CACHE_TTL = 0.0  # off: answers are reused only when a user opts in
DEFAULT_CACHE_MAX_BYTES = 16 * 1024 * 1024

LogFormat = Literal["console", "json"]
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


def positive_float(text: str) -> float:
    """Parse a positive, finite number (ValueError says what it must be)."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be zero or a positive number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def port_number(text: str) -> int:
    """Parse a TCP port, 0 to 65535 (ValueError says what it must be)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _hour(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 23:
        raise ValueError("must be an hour from 0 to 23")
    return value


def _http_url(text: str) -> URL:
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    if url.query_string or url.fragment or url.user or url.password:
        raise ValueError("must not carry credentials, a query or a fragment")
    return url.with_path(url.path.rstrip("/"))


def _redis_url(text: str) -> Secret:
    url = URL(text)
    if url.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return Secret(text)


def _ca_bundle(text: str) -> Path:
    path = Path(text).expanduser()
    try:
        # Loaded once here so that a wrong file stops the start, not the first request.
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError):
        raise ValueError("must be a readable file of PEM CA certificates") from None
    return path


def _proxy_url(text: str) -> SecretURL:
    # "proxy.corp:3128" is common in HTTPS_PROXY; curl and urllib read it as http://.
    url = URL(text if "://" in text else f"http://{text}")
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL of a forward proxy")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise ValueError("must be a proxy's address (scheme, optional user:password@, host, port)")
    return SecretURL(url.with_path(""))


def _secret(text: str) -> Secret:
    if not text.strip() or text != text.strip():
        raise ValueError("must not be empty or padded with spaces")
    return Secret(text)


# Failed client-token guesses cost an attacker one 401 each: only length keeps them hopeless.
MIN_CLIENT_TOKEN_LENGTH = 16


# `name=token` names the client a token belongs to; anything else is a token alone.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _client_tokens(text: str) -> tuple[Secret, ...]:
    tokens = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        # A base64 token may end in "=": only a valid name and a non-empty token make a pair.
        if not (sep and value.strip("=") and _CLIENT_NAME.fullmatch(name)):
            name, value = "", part
        tokens.append(ClientToken(_secret(value).reveal(), name or None))
    if not tokens:
        # "," or "" must not quietly mean "no tokens": that is the open door it looks closed.
        raise ValueError("must name at least one token (comma-separated)")
    if any(len(token.reveal()) < MIN_CLIENT_TOKEN_LENGTH for token in tokens):
        raise ValueError(
            f"must be at least {MIN_CLIENT_TOKEN_LENGTH} characters (try: openssl rand -hex 16)"
        )
    return tuple(tokens)


_FINGERPRINT_DIGITS = frozenset("0123456789abcdef")
MAX_KEY_NAME_LENGTH = 64


def _key_names(text: str) -> tuple[str, ...]:
    names = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, name = part.rpartition("=")
        if sep and (len(key) != 12 or not _FINGERPRINT_DIGITS.issuperset(key)):
            raise ValueError("must be NAME or FINGERPRINT=NAME (12 hex digits, as /status shows)")
        if not name or len(name) > MAX_KEY_NAME_LENGTH or not name.isprintable():
            raise ValueError(f"must name a key in 1 to {MAX_KEY_NAME_LENGTH} printable characters")
        names.append(part)
    return tuple(names)


def _log_format(text: str) -> LogFormat:
    if text == "console":
        return "console"
    if text == "json":
        return "json"
    raise ValueError("must be console or json")


def _log_level(text: str) -> str:
    if text.lower() not in _LOG_LEVELS:
        raise ValueError("must be one of " + ", ".join(_LOG_LEVELS))
    return text.lower()


def parse_bool(text: str) -> bool:
    """Parse true/false, yes/no, on/off, 1/0 (ValueError says what it must be)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


@dataclass(frozen=True)
class Setting:
    """How a `Config` field is set: flag, environment twin, parser and help.

    Declared once, on the field itself (`setting(...)`); `SETTINGS` lists them in field order
    with their names and defaults filled in, and the argument parser, the environment reading
    and the README's table are all made from it.
    """

    name: str
    env: str
    parse: Callable[[str], Any]
    help: str
    default: str | None = None  # the field's default as shown in help and the README
    repeatable: bool = False
    is_flag: bool = False
    # Variables other programs read for the same thing, consulted after `env` (first wins).
    also_env: tuple[str, ...] = ()
    # A switch that turns a default off (`--no-coalesce`) names itself and the value it sets.
    switch: str | None = None
    switch_value: str = "true"

    @property
    def flag(self) -> str:
        return self.switch or "--" + self.name.replace("_", "-")


_T = TypeVar("_T")


def setting(
    default: _T,
    env: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    repeatable: bool = False,
    is_flag: bool = False,
    also_env: tuple[str, ...] = (),
    switch: str | None = None,
    switch_value: str = "true",
    repr: bool = True,
) -> _T:
    """Declare a dataclass field as a setting: its default, environment twin, parser and help.

    `Config`, `login`'s options and the simulator's config declare their settings this way.
    """
    row = Setting("", env, parse, help, None, repeatable, is_flag, also_env, switch, switch_value)
    return field(default=default, repr=repr, metadata={"setting": row})


def _shown(default: object) -> str | None:
    if default is None or default == ():
        return None
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


# The conventional proxy variables (curl, urllib, requests): lower case wins over upper case.
PROXY_VARIABLES = ("https_proxy", "http_proxy", "no_proxy")


@dataclass(frozen=True)
class ProxyEnvironment:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY as the environment set them at start-up."""

    https: SecretURL | None = None
    http: SecretURL | None = None
    no_proxy: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxyEnvironment:
        """Read the variables (a lower-case one, even empty, wins); ConfigError names a bad one."""
        values: dict[str, SecretURL | str | None] = {}
        for name in PROXY_VARIABLES:
            source = name if name in env else name.upper()
            text = env.get(source, "").strip()
            if name == "no_proxy":
                values[name] = text
                continue
            try:
                values[name] = _proxy_url(text) if text else None
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        https, http, no_proxy = values["https_proxy"], values["http_proxy"], values["no_proxy"]
        assert not isinstance(https, str) and not isinstance(http, str)
        return cls(https=https, http=http, no_proxy=str(no_proxy or ""))

    def redacted(self) -> dict[str, str]:
        """The variables that are set, credentials shown as ***."""
        shown = {"https_proxy": self.https, "http_proxy": self.http, "no_proxy": self.no_proxy}
        return {name: str(value) for name, value in shown.items() if value}


def default_state_dir(env: Mapping[str, str]) -> Path:
    """A per-user data directory, following the XDG convention."""
    base = env.get("XDG_DATA_HOME") or str(
        Path(env.get("HOME", "~")).expanduser() / ".local" / "share"
    )
    return Path(base) / "ctct-proxy"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    """The proxy's settings, validated once at start-up and passed to whatever needs them."""

    host: str = setting(DEFAULT_HOST, "CTCT_PROXY_HOST", str, "address to listen on")
    port: int = setting(
        DEFAULT_PORT, "CTCT_PROXY_PORT", port_number, "port (0 = pick a free one and log it)"
    )
    api_key: Secret | None = setting(
        None, "CTCT_API_KEY", _secret, "v2 API key to inject (also names the v3 quota bucket)"
    )
    access_token: Secret | None = setting(
        None, "CTCT_ACCESS_TOKEN", _secret, "access token to inject"
    )
    upstream_v2: URL = setting(
        URL(DEFAULT_UPSTREAM_V2), "CTCT_PROXY_UPSTREAM_V2", _http_url, "where /v2/... goes"
    )
    upstream_v3: URL = setting(
        URL(DEFAULT_UPSTREAM_V3), "CTCT_PROXY_UPSTREAM_V3", _http_url, "where /v3/... goes"
    )
    qps: float = setting(
        DEFAULT_QPS, "CTCT_PROXY_QPS", positive_float, "per-key requests per second"
    )
    daily_quota: int = setting(
        DEFAULT_DAILY_QUOTA, "CTCT_PROXY_DAILY_QUOTA", _positive_int, "per-key requests per UTC day"
    )
    max_wait: float = setting(
        DEFAULT_MAX_WAIT,
        "CTCT_PROXY_MAX_WAIT",
        positive_float,
        "longest a request may wait in the queue, seconds",
    )
    max_queue: int = setting(
        DEFAULT_MAX_QUEUE,
        "CTCT_PROXY_MAX_QUEUE",
        _positive_int,
        "most requests queued per key; beyond it 429 at once",
    )
    pacing_margin: float = setting(
        DEFAULT_PACING_MARGIN,
        "CTCT_PROXY_PACING_MARGIN",
        _non_negative_float,
        "seconds added to each one-second window to absorb network jitter",
    )
    max_body: int = setting(
        DEFAULT_MAX_BODY,
        "CTCT_PROXY_MAX_BODY",
        _positive_int,
        "largest request body in bytes (kept for replays); larger answers 413",
    )
    max_body_memory: int = setting(
        DEFAULT_MAX_BODY_MEMORY,
        "CTCT_PROXY_MAX_BODY_MEMORY",
        _positive_int,
        "request body bytes held at once across all requests; beyond it 503 + Retry-After",
    )
    body_timeout: float = setting(
        DEFAULT_BODY_TIMEOUT,
        "CTCT_PROXY_BODY_TIMEOUT",
        positive_float,
        "seconds a client gets to send a request body, plus 1 per 16 KiB; slower answers 408",
    )
    connect_timeout: float = setting(
        DEFAULT_CONNECT_TIMEOUT,
        "CTCT_PROXY_CONNECT_TIMEOUT",
        positive_float,
        "seconds to connect to the upstream (then 502)",
    )
    upstream_timeout: float = setting(
        DEFAULT_UPSTREAM_TIMEOUT,
        "CTCT_PROXY_UPSTREAM_TIMEOUT",
        positive_float,
        "seconds to wait for upstream data (then 504)",
    )
    v2_reset_hour: int = setting(
        0, "CTCT_PROXY_V2_RESET_HOUR", _hour, "UTC hour at which a v2 daily-quota pause ends"
    )
    redis_url: Secret | None = setting(
        None, "CTCT_PROXY_REDIS_URL", _redis_url, "share quotas between replicas through this Redis"
    )
    replicas: int = setting(
        DEFAULT_REPLICAS,
        "CTCT_PROXY_REPLICAS",
        _positive_int,
        "replicas sharing a key, for the fallback rate when Redis is away",
    )
    state_dir: Path | None = setting(
        None,
        "CTCT_PROXY_STATE_DIR",
        Path,
        "where counters and tokens survive restarts (default: a per-user data dir)",
    )
    log_format: LogFormat | None = setting(
        None,
        "CTCT_PROXY_LOG_FORMAT",
        _log_format,
        "console or json (default: console on a TTY, else json)",
    )
    log_level: str = setting(
        "info", "CTCT_PROXY_LOG_LEVEL", _log_level, "debug, info, warning or error"
    )
    shutdown_grace: float = setting(
        DEFAULT_SHUTDOWN_GRACE,
        "CTCT_PROXY_SHUTDOWN_GRACE",
        _non_negative_float,
        "seconds in-flight requests get to finish on SIGTERM",
    )
    client_token: tuple[Secret, ...] = setting(
        (),
        "CTCT_PROXY_CLIENT_TOKENS",
        _client_tokens,
        "token a client must present; name=token names its client (repeatable; env: comma-separated)",
        repeatable=True,
    )
    key_name: tuple[str, ...] = setting(
        (),
        "CTCT_PROXY_KEY_NAMES",
        _key_names,
        "a name for --api-key on the dashboard, or FINGERPRINT=NAME for any key (repeatable; env: comma-separated)",
        repeatable=True,
    )
    trust_network: bool = setting(
        False,
        "CTCT_PROXY_TRUST_NETWORK",
        parse_bool,
        "allow listening beyond loopback without client tokens",
        is_flag=True,
    )
    coalesce: bool = setting(
        True,
        "CTCT_PROXY_COALESCE",
        parse_bool,
        "identical concurrent GET/HEAD requests each get their own send (default: they share one)",
        is_flag=True,
        switch="--no-coalesce",
        switch_value="false",
    )
    cache_ttl: float = setting(
        DEFAULT_CACHE_TTL,
        "CTCT_PROXY_CACHE_TTL",
        _non_negative_float,
        "seconds a successful GET answer may be reused (0 = no cache)",
    )
    cache_max_bytes: int = setting(
        DEFAULT_CACHE_MAX_BYTES,
        "CTCT_PROXY_CACHE_MAX_BYTES",
        _positive_int,
        "most bytes of answers the cache keeps; least recently used go first",
    )
    client_id: Secret | None = setting(
        None, "CTCT_CLIENT_ID", _secret, "v3 OAuth client id (for refreshing the access token)"
    )
    client_secret: Secret | None = setting(
        None, "CTCT_CLIENT_SECRET", _secret, "v3 OAuth client secret (absent for PKCE apps)"
    )
    refresh_token: Secret | None = setting(
        None, "CTCT_REFRESH_TOKEN", _secret, "v3 OAuth refresh token"
    )
    token_url: URL = setting(
        URL(DEFAULT_TOKEN_URL), "CTCT_PROXY_TOKEN_URL", _http_url, "OAuth token endpoint"
    )
    ca_bundle: Path | None = setting(
        None,
        "CTCT_PROXY_CA_BUNDLE",
        _ca_bundle,
        "CA file for the upstream and token endpoint (replaces the system trust)",
        also_env=("SSL_CERT_FILE",),
    )
    egress_proxy: SecretURL | None = setting(
        None,
        "CTCT_PROXY_EGRESS_PROXY",
        _proxy_url,
        "forward proxy for outbound calls (wins over HTTPS_PROXY / HTTP_PROXY; NO_PROXY applies)",
    )
    # Not a setting of its own: the conventional variables, read once like the rest.
    proxy_environment: ProxyEnvironment = field(default_factory=ProxyEnvironment)

    @property
    def spacing(self) -> float:
        """Seconds between two sends of one key: the window plus its margin, over qps."""
        return (1.0 + self.pacing_margin) / self.qps

    def redacted(self) -> dict[str, object]:
        """The effective configuration as loggable values (secrets shown as ***)."""
        out: dict[str, object] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if isinstance(value, tuple):
                value = [str(v) for v in value]
            elif value is not None and not isinstance(value, bool | int | float):
                value = str(value)
            out[setting.name] = value
        if environment := self.proxy_environment.redacted():
            out["proxy_environment"] = environment
        return out

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any], env: Mapping[str, str]) -> Config:
        """Build from parsed flags (None = not given) and an environment mapping.

        Raises ConfigError naming the flag (or its environment twin) of the first bad value.
        """
        values = read_settings(SETTINGS, flags, env)
        values.setdefault("state_dir", default_state_dir(env))
        values["proxy_environment"] = ProxyEnvironment.from_env(env)
        config = cls(**values)
        if not _is_loopback(config.host) and not config.client_token and not config.trust_network:
            raise ConfigError(
                f"--host: listening on {config.host} needs --client-token (or --trust-network "
                "if every program that can reach it may use your Constant Contact credentials)"
            )
        if not config.api_key and any("=" not in name for name in config.key_name):
            raise ConfigError("--key-name: a NAME without FINGERPRINT= names --api-key, not set")
        if config.max_body_memory < config.max_body:
            raise ConfigError(
                "--max-body-memory: must be at least --max-body (one body of the largest size)"
            )
        if config.refresh_token and not config.client_id:
            raise ConfigError("--client-id: is required with --refresh-token")
        return config


def settings_of(cls: type[Any]) -> tuple[Setting, ...]:
    """The settings declared on a dataclass's fields, in field order, names and defaults set."""
    rows = []
    for item in fields(cls):
        row = item.metadata.get("setting")
        if isinstance(row, Setting):
            rows.append(replace(row, name=item.name, default=_shown(item.default)))
    return tuple(rows)


SETTINGS: tuple[Setting, ...] = settings_of(Config)


def read_settings(
    rows: Iterable[Setting], flags: Mapping[str, Any], env: Mapping[str, str]
) -> dict[str, Any]:
    """The parsed values of the settings given as flags (None = not given) or in `env`.

    Settings given neither way are left out: their field's default applies. Raises
    ConfigError naming the flag (or its environment twin) of the first bad value.
    """
    values: dict[str, Any] = {}
    for setting in rows:
        given = flags.get(setting.name)
        source = setting.flag
        if given is None or given == [] or given is False:
            given = env.get(setting.env)
            source = setting.env
            for other in setting.also_env:
                if given is None and env.get(other):
                    given, source = env[other], other
            if given is not None and setting.repeatable:
                given = [given]
        if given is None:
            continue  # the field's own default
        try:
            if setting.repeatable:
                parts: list[object] = []
                for item in given if isinstance(given, list) else [given]:
                    parts.extend(setting.parse(item))
                values[setting.name] = tuple(parts)
            else:
                values[setting.name] = setting.parse(str(given))
        except ValueError as exc:
            message = str(exc) if "must" in str(exc) else "is not a valid value"
            raise ConfigError(f"{source}: {message}") from None
    return values


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting of `serve`."""
    add_arguments(parser, SETTINGS)


def add_arguments(parser: argparse.ArgumentParser, rows: Iterable[Setting]) -> None:
    """Add one flag per setting; defaults stay None so the environment can fill them."""
    for setting in rows:
        help_text = f"{setting.help} [env {setting.env}"
        help_text += f"; default {setting.default}]" if setting.default is not None else "]"
        if setting.is_flag:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                action="store_const",
                const=setting.switch_value,
                help=help_text,
            )
        elif setting.repeatable:
            parser.add_argument(setting.flag, dest=setting.name, action="append", help=help_text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, help=help_text)


def environ() -> Mapping[str, str]:
    """The process environment; read here so no other module touches os.environ."""
    return os.environ
