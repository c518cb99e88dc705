"""Structured logging: one pipeline for our events and aiohttp's, secrets scrubbed in all of it.

JSON when stdout is not a terminal (containers, files), console rendering on a TTY.
"""

from __future__ import annotations

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


def configure(log_format: str | None, level: str, stream: Any = None) -> None:
    """Set up structlog and the stdlib root logger once per process."""
    stream = stream if stream is not None else sys.stdout
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
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


def level_check(name: str) -> Callable[[int], bool]:
    """Whether a logger would write an event at a level (the stdlib's cached test)."""
    return logging.getLogger(name).isEnabledFor


def get_logger(name: str) -> Any:
    """A structlog logger named after its module."""
    return structlog.stdlib.get_logger(name)
