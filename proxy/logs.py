"""Structured logging: the same processors for our events and aiohttp's, secrets scrubbed in all.

JSON when stdout is not a terminal (containers, files), console rendering on a TTY. Our own
events go from structlog straight to the stream; other libraries' come through the stdlib.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

from proxy.credentials import redact


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    if isinstance(value, bytes | bytearray):
        return redact(bytes(value).decode("utf-8", "replace"))
    # Anything else (a URL, a path, an object) the renderer would write as its repr, where a
    # query's api_key would go out untouched: render it here, scrubbed.
    return redact(str(value))


# What the pipeline itself adds (level, logger name, time) cannot hold a secret.
_OWN_KEYS = frozenset({"level", "logger", "timestamp"})


def redact_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor that removes secrets from every value of an event."""
    for key, value in event_dict.items():
        # `_record` and `_from_structlog` are the formatter's own, removed before rendering.
        if key in _OWN_KEYS or key.startswith("_") or value is None:
            continue
        cls = type(value)
        if cls is str:
            event_dict[key] = redact(value)
        elif cls is not int and cls is not float and cls is not bool:
            event_dict[key] = _scrub(value)
    return event_dict


def _json_renderer() -> structlog.processors.JSONRenderer:
    # One encoder for every line (json.dumps with arguments builds one per call).
    # `redact_event` already renders non-JSON values as scrubbed text; `default` is for the
    # keys it leaves alone.
    encode = json.JSONEncoder(default=lambda value: redact(str(value))).encode
    return structlog.processors.JSONRenderer(serializer=lambda obj, **_: encode(obj))


class _Sink:
    """Where every line goes: the stream, level and rendering `configure` last chose.

    Loggers are cached on first use (structlog builds each once); they all write through
    this one object, so configuring again (tests do, with their own streams) reaches them.
    """

    def __init__(self) -> None:
        self.stream: Any = None  # not configured yet: whatever sys.stdout is at the time
        self.level = logging.INFO
        self.render: Callable[..., Any] = _json_renderer()
        self.broken = False

    def write(self, line: str) -> None:
        stream = sys.stdout if self.stream is None else self.stream
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:
            # A closed or broken log stream must not fail requests (the stdlib's handlers
            # swallow it too); say so once where it may still be seen.
            if not self.broken:
                self.broken = True
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(f"ctct-proxy: log stream failed: {type(exc).__name__}\n")


_SINK = _Sink()

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class _Line:
    """What a structlog logger wraps: its name, and a way to write the rendered line."""

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, line: str) -> None:
        _SINK.write(line)

    debug = info = warning = warn = error = exception = critical = fatal = msg


def _at_level(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    if _LEVELS.get(method, logging.INFO) < _SINK.level:
        raise structlog.DropEvent
    return event_dict


def _render(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    return _SINK.render(logger, method, event_dict)


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_event,
    ]


def configure(log_format: str | None, level: str, stream: Any = None) -> None:
    """Set up our events' pipeline and the stdlib root logger's (for aiohttp's and others').

    Our own events go straight from structlog to the stream: the stdlib's records, handler
    lock and formatter would cost more than the line itself. Other libraries' stdlib logs are
    rendered by the same processors into the same stream.
    """
    stream = stream if stream is not None else sys.stdout
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    renderer: Any = (
        _json_renderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    _SINK.stream, _SINK.level, _SINK.render = stream, logging.getLevelName(level.upper()), renderer
    _SINK.broken = False
    structlog.configure(
        processors=[_at_level, *_shared_processors(), _render],
        logger_factory=_Line,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared_processors(),
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    # Nothing rendered uses a record's call site, thread or process: the stdlib's documented
    # switches skip looking them up (a stack walk and a getpid per line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our own request_finished event replaces aiohttp's access log.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def enabled_for(level: int) -> bool:
    """Whether the proxy's own loggers write events at a level (one level for all of them)."""
    return level >= _SINK.level


def get_logger(name: str) -> Any:
    """A structlog logger named after its module."""
    return structlog.get_logger(name)
