"""Secrets kept out of what is printed or logged: every line the CLI, `pipeline up` and
the health checks show that may hold a service URL goes through `redact`."""

from __future__ import annotations

import re

MASK = "***"
# `scheme://user:password@host...`: the password runs to the last `@` before a blank, a quote
# or `;` (between Celery's fail-over URLs), so one with an unescaped `@` or `/` is masked whole;
# when in doubt (an `@` in a query), more is masked, never less. A user without a password
# (`postgresql://user@host`) is left as it is.
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^\s'\";]*@")
# libpq's `password=...`, in a connection string or a URL's query.
PASSWORD_PARAMETER = re.compile(r"(?P<head>\bpassword=)[^&\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Return `text` with the password of every URL in it, and every `password=` value,
    replaced by `***`."""
    text = URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    return PASSWORD_PARAMETER.sub(rf"\g<head>{MASK}", text)


def error_line(error: BaseException) -> str:
    """The first line of an error's message (a driver's cause when SQLAlchemy wraps one), redacted."""
    cause = getattr(error, "orig", None) or error
    return redact((str(cause).strip().splitlines() or [type(cause).__name__])[0])
