"""Keep secrets out of logs: every log record of the process is redacted when it is made.

Known secrets (API keys, the JWT and signing secrets, the database password) are replaced
wherever they appear, and so are the shapes of credentials that are not known in advance:
bearer tokens, JWTs, passwords in DSNs and URL signatures.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "[redacted]"

_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer\s+)[^\s'\",;]+"), r"\1" + REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"(://[^/\s:@]+:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
    (
        re.compile(r"(?i)\b(signature|x-amz-signature|x-amz-credential)=[^&\s'\"]+"),
        r"\1=" + REDACTED,
    ),
)
_MIN_SECRET_CHARS = 6
"""Shorter strings would redact ordinary words; no real secret is this short."""

_lock = threading.Lock()
_secrets: set[str] = set()
_installed = False


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known secrets and credential shapes replaced by ``[redacted]``."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return text


def install_log_redaction(secrets: Iterable[str]) -> None:
    """Redact every log record made from now on in this process (idempotent; secrets add up).

    A record factory rather than a handler filter: Ray and uvicorn add their own handlers, and
    a factory covers records whichever handler prints them.
    """
    global _installed
    with _lock:
        _secrets.update(secret for secret in secrets if secret)
        if _installed:
            return
        _installed = True
        previous = logging.getLogRecordFactory()
    logging.setLogRecordFactory(_redacting_factory(previous))


def _redacting_factory(
    previous: Callable[..., logging.LogRecord],
) -> Callable[..., logging.LogRecord]:
    formatter = logging.Formatter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        known = tuple(_secrets)
        message = record.getMessage()
        cleaned = redact(message, known)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(formatter.formatException(record.exc_info), known)
        return record

    return factory
