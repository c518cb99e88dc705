"""In front of aiohttp's request parser: how much of a request head it may hold, and framing.

aiohttp's C parser (llhttp) keeps every header of the head it is reading, and bounds only
each field (`max_field_size`) and their number (`max_headers`): a client that never ends its
head can make it hold up to 100 x 8,190 bytes per connection, several copies of it in Python
objects, before any handler (and any client-token check) runs. 1,000 such connections held
1.5 GB.

`HeadGuard` stands between a connection and that parser. It feeds the parser piecewise, cut
where a head or a body can end, so that it always knows whether the bytes it is about to
hand over belong to a request head, and refuses (431) a head longer than `MAX_HEAD_BYTES`
*before* the parser has stored it. It reads no framing itself beyond finding the blank line
that ends a head: body lengths come from the parser's own messages. The same place refuses a
`Transfer-Encoding` other than exactly `chunked`, which llhttp accepts in several spellings.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import hdrs
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import _ErrInfo

# A request line and its headers together. Constant Contact requests need a few KiB (the
# longest part is a JWT access token); nginx's default allows 32 KiB across 4 buffers.
MAX_HEAD_BYTES = 32 * 1024

_END = b"\r\n\r\n"
# Over complete lines (the head as it arrives); aiohttp strips trailing whitespace from what
# it reports, so "chunked " can only be told from "chunked" here. Anchored on the newline
# before a field (a "^" in multi-line mode is ten times slower).
_TRANSFER_ENCODING = re.compile(rb"(?i)\ntransfer-encoding:[ \t]*([^\r\n]*)\r?(?=\n)")
# Of a line not finished yet, only this much is kept: no valid Transfer-Encoding line is
# longer, and a longer one is marked (a NUL) so that it can never read as valid.
_LINE_KEPT = 64
_Message = tuple[Any, StreamReader]
_Fed = tuple[list[_Message], bool, bytes]


class HeadTooLarge(BadHttpMessage):
    """A request head (request line and headers) longer than the proxy holds."""

    code = 431

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request line and headers are longer than {limit} bytes.")
        self.limit = limit


class TransferEncodingRefused(BadHttpMessage):
    """A Transfer-Encoding other than exactly one `chunked`."""

    def __init__(self) -> None:
        super().__init__("Transfer-Encoding other than exactly 'chunked'.")


class HeadGuard:
    """Wraps a connection's aiohttp request parser; see the module docstring.

    The guard is in one of three states between two calls: in a head (counting its bytes),
    in a Content-Length body (counting down), or in a chunked body (which ends, like a head,
    at a blank line). What arrives while a body's reader has paused the connection is kept
    here until aiohttp resumes reading: at most one read of the socket.
    """

    __slots__ = (
        "_body_left",
        "_carry",
        "_head",
        "_held",
        "_limit",
        "_line",
        "_parser",
        "_payload",
        "_protocol",
        "_refused",
        "_te_values",
    )

    def __init__(self, parser: Any, protocol: BaseProtocol, limit: int = MAX_HEAD_BYTES) -> None:
        self._parser: Any = parser
        self._protocol: Any = protocol
        self._limit = limit
        self._head = 0  # bytes of the head being read
        self._line = b""  # the start of the head's unfinished last line
        self._te_values: list[bytes] = []  # the head's Transfer-Encoding values, as sent
        self._carry = b""  # the last bytes fed, to find a blank line split across reads
        self._body_left = 0  # bytes of a Content-Length body still to come
        self._payload: StreamReader | None = None  # a chunked body being read
        self._held = b""
        self._refused = False

    def close(self) -> None:
        """Let go of the parser and the connection (they refer to each other through here)."""
        self._parser = self._protocol = None
        self._te_values, self._held, self._payload = [], b"", None

    def message_consumed(self) -> None:
        """The parser's own (called once per request: spelled out, not looked up)."""
        self._parser.message_consumed()

    def __getattr__(self, name: str) -> Any:
        # pause_reading, set_upgraded, feed_eof: the parser's own.
        return getattr(self._parser, name)

    @property
    def reading_head(self) -> bool:
        """Whether the next byte would belong to a request head (no body is being read)."""
        return not self._body_left and (self._payload is None or self._payload.is_eof())

    @property
    def partial_head(self) -> bool:
        """Whether part of a request head has arrived and not its end."""
        return self.reading_head and self._head > 0

    def feed_data(self, data: bytes) -> _Fed:
        """The parser's `feed_data`, fed piecewise: (messages, upgraded, tail).

        Nothing is fed while a body's reader has paused the connection (the parser would
        keep the bytes unparsed, out of sight); aiohttp's `data_received(b"")` on resuming
        brings them back. A full message queue needs no such care: the parser stops at a
        message's end, and every piece fed here ends at one or contains none.
        """
        if self._refused:
            return [], False, b""
        messages: list[_Message] = []
        if not data:
            # aiohttp resumed reading: the parser first finishes what it kept while paused.
            fed = self._feed(b"", messages, b"", 0)
            if fed is not None:
                return fed
        if self._held:
            data, self._held = self._held + data, b""
        pos, size = 0, len(data)
        while pos < size:
            if self._protocol._reading_paused:
                self._held = data[pos:]
                break
            in_head = at_end = False
            if self._body_left:
                stop = min(size, pos + self._body_left)
                self._body_left -= stop - pos
            elif self._payload is not None:
                if self._payload.is_eof():
                    self._payload = None
                    continue
                # A chunked body ends with a blank line: cut at each, see whether it ended.
                end = self._end_of(data, pos)
                stop = size if end < 0 else end
            else:
                end = self._end_of(data, pos)
                stop, at_end, in_head = (size, False, True) if end < 0 else (end, True, True)
                if stop - pos > self._limit - self._head:
                    return self._refuse(messages, HeadTooLarge(self._limit), 431)
                self._head += stop - pos
            segment = data if stop - pos == size else data[pos:stop]
            if in_head:
                self._scan_head(segment)
            self._carry = segment[-3:] if len(segment) >= 3 else (self._carry + segment)[-3:]
            emitted = len(messages)
            fed = self._feed(segment, messages, data, stop)
            if fed is not None:
                return fed
            if len(messages) > emitted:
                refused = self._begin(messages[-1], at_end)
                if refused is not None:
                    del messages[-1]
                    return self._refuse(messages, refused, 400)
            pos = stop
        return messages, False, b""

    def _scan_head(self, segment: bytes) -> None:
        """Note the Transfer-Encoding values of a head as it is fed, keeping none of it."""
        text = self._line + segment if self._line else segment
        end = text.rfind(b"\n") + 1
        if end:
            self._te_values.extend(_TRANSFER_ENCODING.findall(text, 0, end))
        # The unfinished line, with the newline before it for the pattern to anchor on.
        start = max(0, end - 1)
        kept = text[start : start + _LINE_KEPT]
        self._line = kept + b"\0" if len(text) - start > _LINE_KEPT else kept

    def _end_of(self, data: bytes, pos: int) -> int:
        """Where the first blank line at or after pos ends (-1 if none), across reads too."""
        if pos == 0 and self._carry:
            found = (self._carry + data[:3]).find(_END)
            if found >= 0:
                return found + len(_END) - len(self._carry)
        found = data.find(_END, pos)
        return found + len(_END) if found >= 0 else -1

    def _feed(
        self, segment: bytes, messages: list[_Message], data: bytes, stop: int
    ) -> _Fed | None:
        """Hand a segment to the parser; a result to return at once if it upgraded or failed.

        `data[stop:]` is what this call has not fed yet.
        """
        try:
            emitted, upgraded, tail = self._parser.feed_data(segment)
        except HttpProcessingError as exc:
            return self._refuse(messages, exc, 400)
        messages.extend(emitted)
        if upgraded:
            # From here aiohttp keeps the bytes itself and gives them back after the answer.
            return messages, True, tail + data[stop:]
        return None

    def _begin(self, message: _Message, at_end: bool) -> HttpProcessingError | None:
        """A head ended: check its framing, then expect its body (if any)."""
        values, self._te_values, self._line = self._te_values, [], b""
        # A head cut where its blank line ended is all accounted for; a message the parser
        # finished elsewhere (an HTTP/0.9 line) leaves what was fed counted, not free.
        if at_end:
            self._head, self._carry = 0, b""
        msg, payload = message
        if hdrs.TRANSFER_ENCODING in msg.headers and values != [b"chunked"]:
            return TransferEncodingRefused()
        if payload is EMPTY_PAYLOAD or payload.is_eof():
            return None
        if msg.chunked:
            self._payload = payload
        else:
            length = msg.headers.get(hdrs.CONTENT_LENGTH, "")
            # Anything else (a body read until the connection closes) is left to aiohttp,
            # which hands such bytes back through an upgrade; they count as a head here.
            self._body_left = int(length) if length.isdigit() else 0
        return None

    def _refuse(self, messages: list[_Message], exc: HttpProcessingError, status: int) -> _Fed:
        """Answer what came before, then this error; read nothing more from the connection."""
        self._refused = True
        self._te_values, self._held = [], b""
        messages.append((_ErrInfo(status=status, exc=exc, message=exc.message), EMPTY_PAYLOAD))
        return messages, False, b""
