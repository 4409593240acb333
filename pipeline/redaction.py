"""Credentials by their shape: refused where a value would be published, masked where text is recorded.

Ray shows a job's environment and metadata to anyone who can read the dashboard, and a run's
events, manifests, state and logs are read by many people for a long time. A name check alone
(``*_KEY``) lets a secret through under a harmless name, so values are checked by shape too:

- :func:`secret_kind` says what a whole value looks like (``None``: nothing secret-like); the
  job submission refuses such values with a one-line error naming the variable, never the value;
- :func:`redact` masks secret-looking spans inside text (an event, a manifest, an error, a log
  line) and leaves the rest, so a record stays useful;
- :class:`RedactingFilter` applies :func:`redact` to every log record a handler emits.

The shapes: AWS access key ids, AWS secret keys (a whole value, or next to an access key id or a
secret-key label in text — a bare 40-character token in text is too often a path or a hash),
URLs carrying ``user:password@``, bearer tokens and PEM blocks.
"""

from __future__ import annotations

import logging
import re

__all__ = ["secret_kind", "redact", "RedactingFilter", "install_log_redaction"]

_ACCESS_KEY_ID = r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"
_SECRET_KEY = r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"

# (kind, pattern, group to mask: 0 = the whole match)
_TEXT_SHAPES: tuple[tuple[str, re.Pattern[str], int], ...] = (
    ("a PEM block", re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|\Z)", re.S), 0),
    # The scheme starts a token and is short: unanchored and unbounded, every position of a long
    # token would scan to its end (quadratic: a 40k-character token took 3 s, a 30 MB manifest hours).
    ("a URL with a password", re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s/:@]+:([^\s/@]+)@"),
     1),
    ("a bearer token", re.compile(r"\bBearer\s+([A-Za-z0-9._~+/-]{8,}=*)", re.I), 1),
    ("an AWS secret access key", re.compile(
        r"(?:" + _ACCESS_KEY_ID + r"[^\n]{1,60}?|(?i:secret_?access_?key)\W{1,6})(?<![A-Za-z0-9/+])(" + _SECRET_KEY + ")"),
        1),
    ("an AWS access key id", re.compile(_ACCESS_KEY_ID), 0),
)
_WHOLE_SECRET_KEY = re.compile(r"(?=.*[A-Z])(?=.*[a-z])(?=.*[0-9/+])[A-Za-z0-9/+]{40}")


def secret_kind(value: str) -> str | None:
    """What credential ``value`` looks like ("an AWS access key id", ...), or None."""
    stripped = value.strip()
    if _WHOLE_SECRET_KEY.fullmatch(stripped):
        return "an AWS secret access key"
    for kind, pattern, _ in _TEXT_SHAPES:
        if pattern.search(stripped):
            return kind
    return None


def redact(text: str) -> str:
    """``text`` with every secret-looking span replaced by ``<redacted>``."""
    for _, pattern, group in _TEXT_SHAPES:
        if pattern.search(text):
            text = pattern.sub(lambda m, g=group: _mask(m, g), text)
    return text


def _mask(match: re.Match[str], group: int) -> str:
    if group == 0:
        return "<redacted>"
    start, end = match.span(group)
    whole_start = match.start()
    return match.group(0)[:start - whole_start] + "<redacted>" + match.group(0)[end - whole_start:]


class RedactingFilter(logging.Filter):
    """Masks credentials in a record's message and traceback before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_log_redaction() -> None:
    """Put a :class:`RedactingFilter` on every handler of the root logger (call after configuring it)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
