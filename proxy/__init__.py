"""ctct-proxy: a local proxy that keeps Constant Contact API clients within their quota."""

from __future__ import annotations

__version__ = "0.1.0"
