"""`ctct-proxy login`: the authorization-code flow with PKCE, for a person at a terminal.

It prints (and, if asked, opens) Constant Contact's authorize URL, receives the redirect on a
loopback port, exchanges the code at the token endpoint and saves the token set where
`serve` finds it (`oauth-tokens.json` under `--state-dir`, see proxy/oauth/tokens.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import secrets
import time
import webbrowser
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from yarl import URL

from proxy.config import (
    PROXY_VARIABLES,
    SETTINGS,
    Config,
    ConfigError,
    add_arguments,
    parse_bool,
    port_number,
    positive_float,
    read_settings,
    setting,
    settings_of,
)
from proxy.credentials import fingerprint
from proxy.oauth.tokens import FileTokenStore, RefreshFailed, TokenClient, TokenSet, state_path

DEFAULT_AUTHORIZE_URL: Final = "https://authz.constantcontact.com/oauth2/default/v1/authorize"
DEFAULT_REDIRECT_HOST: Final = "localhost"
DEFAULT_REDIRECT_PORT: Final = 8765
DEFAULT_SCOPE: Final = "contact_data offline_access"
DEFAULT_LOGIN_TIMEOUT: Final = 300.0
CALLBACK_PATH: Final = "/callback"


class LoginFailed(Exception):
    """`ctct-proxy login` could not get tokens; the message says why (never a secret)."""


def _authorize_url(text: str) -> URL:
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host or url.query_string:
        raise ValueError("must be an http:// or https:// URL with a host and no query")
    return url


def _host(text: str) -> str:
    if not text or any(c in text for c in "/:?#@ "):
        raise ValueError("must be a host name such as localhost or 127.0.0.1")
    return text


def _scope(text: str) -> str:
    if not text.strip():
        raise ValueError("must name at least one scope")
    return " ".join(text.split())


@dataclass(frozen=True)
class LoginOptions:
    """How `login` talks to the person and the authorization server."""

    authorize_url: URL = setting(
        URL(DEFAULT_AUTHORIZE_URL),
        "CTCT_PROXY_AUTHORIZE_URL",
        _authorize_url,
        "the authorization server's authorize URL",
    )
    redirect_host: str = setting(
        DEFAULT_REDIRECT_HOST, "CTCT_PROXY_REDIRECT_HOST", _host, "host name in the redirect URI"
    )
    redirect_port: int = setting(
        DEFAULT_REDIRECT_PORT,
        "CTCT_PROXY_REDIRECT_PORT",
        port_number,
        "loopback port for the redirect (0 = any)",
    )
    scope: str = setting(DEFAULT_SCOPE, "CTCT_PROXY_SCOPE", _scope, "scopes to ask for")
    timeout: float = setting(
        DEFAULT_LOGIN_TIMEOUT,
        "CTCT_PROXY_LOGIN_TIMEOUT",
        positive_float,
        "seconds to wait for the redirect",
    )
    open_browser: bool = setting(
        False,
        "CTCT_PROXY_OPEN_BROWSER",
        parse_bool,
        "also open the address in the default browser (default: only print it)",
        is_flag=True,
    )


LOGIN_SETTINGS: Final = settings_of(LoginOptions)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier (86 unreserved characters) and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(64)
    return verifier, _b64url(hashlib.sha256(verifier.encode()).digest())


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable())[:200]


async def login(config: Config, options: LoginOptions, say: Callable[[str], None] = print) -> Path:
    """Sign a person in through the browser and save the tokens where `serve` finds them.

    Prints the authorize URL (and opens it if asked), receives the redirect on a loopback
    listener, checks `state`, exchanges the code with its PKCE verifier and saves the
    tokens. Returns the state file's path. Raises LoginFailed or ConfigError.
    """
    if config.client_id is None:
        raise ConfigError("--client-id: is required for login")
    path = state_path(config)
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def callback(request: web.Request) -> web.Response:
        query = request.query
        if not secrets.compare_digest(query.get("state", "").encode(), state.encode()):
            # Maybe an old tab: say so, and keep waiting for the right one.
            return web.Response(
                status=400, text="This sign-in does not match the one the terminal started.\n"
            )
        if "error" in query and not received.done():
            error = _printable(query.get("error", ""))
            detail = _printable(query.get("error_description", ""))
            received.set_exception(
                LoginFailed(f"the authorization server answered {error}: {detail}".rstrip(": "))
            )
            return web.Response(status=400, text=f"Sign-in failed ({error}).\n")
        code = query.get("code", "")
        if not code:
            return web.Response(status=400, text="No authorization code in the redirect.\n")
        if not received.done():
            received.set_result(code)
        return web.Response(
            text="ctct-proxy: sign-in received. "
            "You can close this tab and return to the terminal.\n"
        )

    app = web.Application()
    app.router.add_get(CALLBACK_PATH, callback)
    runner = web.AppRunner(app, access_log=None)  # the access log would record the code
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", options.redirect_port)
        try:
            await site.start()
        except OSError as exc:
            raise LoginFailed(
                f"--redirect-port: cannot listen on 127.0.0.1:{options.redirect_port} "
                f"({exc.strerror})"
            ) from None
        port = _listening_port(runner) or options.redirect_port
        redirect_uri = f"http://{options.redirect_host}:{port}{CALLBACK_PATH}"
        url = options.authorize_url.with_query(
            client_id=config.client_id.reveal(),
            redirect_uri=redirect_uri,
            response_type="code",
            scope=options.scope,
            state=state,
            code_challenge=challenge,
            code_challenge_method="S256",
        )
        say("Open this address in a browser and sign in to Constant Contact:")
        say("")
        say(f"  {url}")
        say("")
        say(f"Waiting for the redirect to {redirect_uri} (register it in your app) ...")
        if options.open_browser:
            webbrowser.open(str(url))
        try:
            code = await asyncio.wait_for(received, options.timeout)
        except TimeoutError:
            raise LoginFailed(
                f"no redirect arrived within {options.timeout:g} seconds; run login again"
            ) from None
    finally:
        await runner.cleanup()

    client = TokenClient.open(config)
    try:
        answer = await client.exchange_code(code, redirect_uri, verifier)
    except RefreshFailed as failure:
        hint = f" ({failure.description})" if failure.description else ""
        raise LoginFailed(f"the token endpoint refused the code: {failure.code}{hint}") from None
    finally:
        await client.close()
    if answer.refresh_token is None:
        raise LoginFailed(
            "the token endpoint gave no refresh token: include offline_access in --scope"
        )
    now = time.time()
    origin = fingerprint(config.refresh_token.reveal()) if config.refresh_token else None
    tokens = TokenSet(
        refresh_token=answer.refresh_token,
        access_token=answer.access_token,
        obtained_at=now,
        expires_at=now + answer.expires_in,
        client=fingerprint(config.client_id.reveal()),
        origin=origin,
        scope=answer.scope,
    )
    store = FileTokenStore(path)
    try:
        async with store.exclusive():
            await store.save(tokens)
    except OSError as exc:
        raise LoginFailed(f"cannot save the tokens in {path}: {exc.strerror}") from None
    say(f"Signed in. Saved the OAuth tokens in {path} (readable by you only).")
    say("`ctct-proxy serve` with the same --client-id and --state-dir keeps them fresh.")
    return path


def _listening_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


# -- the login command's settings -------------------------------------------------------------

# The serve settings `login` shares (same flags, same environment twins). The configured
# refresh token is read from the environment only: the saved tokens record that they
# supersede it, so a `serve` in the same environment uses them rather than it.
_SHARED: Final = (
    "client_id",
    "client_secret",
    "token_url",
    "state_dir",
    "refresh_token",
    "ca_bundle",
    "egress_proxy",
)
_SHARED_FLAGS: Final = (
    "client_id",
    "client_secret",
    "token_url",
    "state_dir",
    "ca_bundle",
    "egress_proxy",
)


def add_login_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `login` command's flags; each has an environment twin."""
    add_arguments(parser, [s for s in SETTINGS if s.name in _SHARED_FLAGS])
    add_arguments(parser, LOGIN_SETTINGS)


def login_settings(flags: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Config, LoginOptions]:
    """Build `login`'s configuration from its flags and the environment (flags win).

    Raises ConfigError naming the setting.
    """
    shared_env = {
        *(name for s in SETTINGS if s.name in _SHARED for name in (s.env, *s.also_env)),
        *PROXY_VARIABLES,
        *(name.upper() for name in PROXY_VARIABLES),
        "HOME",
        "XDG_DATA_HOME",
    }
    config = Config.from_sources(
        {name: flags.get(name) for name in _SHARED}, {k: env[k] for k in shared_env if k in env}
    )

    options = read_settings(LOGIN_SETTINGS, flags, env)
    if config.client_id is None:
        raise ConfigError("--client-id: is required for login (env CTCT_CLIENT_ID)")
    return config, LoginOptions(**options)
