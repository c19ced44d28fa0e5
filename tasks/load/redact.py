"""Keep a load test's credentials out of the results database, the reports and the CLI.

A target URL may carry ``user:password@`` or a token in its query string, and headers an
``Authorization`` or an API key. The generator needs them; nothing that is stored or shown
does. What is redacted: the password of a URL (a lone user name, often a token, too), the
values of query parameters and headers whose names look secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# Names of headers and query parameters whose values are credentials.
_SECRET_NAME = re.compile(
    r"auth|token|secret|passw|pwd|key|cookie|session|credential|signature|sig$|jwt|bearer",
    re.IGNORECASE,
)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_url(url: str) -> str:
    """``url`` with its userinfo password and secret-looking query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _scrub_userinfo(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        # user:password keeps the user; a lone user name is usually a token: mask it.
        netloc = f"{user}:{MASK}@{hostport}" if has_password else f"{MASK}@{hostport}"
    query = "&".join(_redact_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_pair(pair: str) -> str:
    name, eq, value = pair.partition("=")
    return f"{name}={MASK}" if eq and value and is_secret_name(name) else pair


def _scrub_userinfo(text: str) -> str:
    return re.sub(r"(://[^:/@\s]*):[^@/\s]*@", rf"\1:{MASK}@", text)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: MASK if is_secret_name(k) else v for k, v in headers.items()}


def secrets_of(url: str | None, headers: Mapping[str, str]) -> list[str]:
    """The literal secret strings of a target, longest first (for scrubbing free text)."""
    found: list[str] = []
    if url:
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is not None:
            if parts.password:
                found.append(parts.password)
            elif parts.username:
                found.append(parts.username)
            for pair in parts.query.split("&") if parts.query else ():
                name, eq, value = pair.partition("=")
                if eq and value and is_secret_name(name):
                    found.append(value)
    found += [v for k, v in headers.items() if is_secret_name(k) and v]
    for value in list(found):  # "Bearer abc": the token alone may appear in a message too
        found += [word for word in value.split() if len(word) >= 8 and word != value]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Free text (an error message) with every known secret and URL password masked."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return _scrub_userinfo(text)
