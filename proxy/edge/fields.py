"""Reading numbers out of header fields that anyone can write.

`str.isdigit` is true for "²" and "٣" (which `int` then refuses or reads as 3), and `int`
refuses more than 4,300 digits: a field is read as a number only if it is a short run of
ASCII digits. Anything else is as if the field were absent.
"""

from __future__ import annotations

# Nine digits is over 31 years in seconds: longer than any wait the proxy would honour, and
# short enough that no value can cost anything to convert.
MAX_SECONDS_DIGITS = 9


def parse_seconds(text: str | None) -> int | None:
    """Whole seconds written as 1 to 9 ASCII digits (surrounding whitespace allowed), or None."""
    if text is None:
        return None
    text = text.strip(" \t")
    if not 0 < len(text) <= MAX_SECONDS_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def parse_wait_preference(prefer: str | None) -> int | None:
    """The `wait` preference of a Prefer header (RFC 7240), in seconds, if any is readable.

    The first `wait` wins; a value that is not a short run of ASCII digits (quoted or not)
    counts as no preference.
    """
    if not prefer:
        return None
    for item in prefer.split(","):
        name, _, value = item.split(";")[0].strip().partition("=")
        if name.strip().lower() == "wait":
            return parse_seconds(value.strip(" \t").strip('"'))
    return None
