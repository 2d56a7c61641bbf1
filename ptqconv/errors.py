"""The two kinds of failure a user can meet, mapped to exit statuses by the CLI."""

from __future__ import annotations


class PtqError(Exception):
    """The conversion failed (exit status 1): bad model contents, an unsupported graph..."""

    exit_code = 1


class PtqUsageError(PtqError):
    """The command line or the config is wrong (exit status 2)."""

    exit_code = 2


def one_line(text: str) -> str:
    """`text` safe to show inside a one-line message (control characters escaped)."""
    return text if text.isprintable() else repr(text)


def shown(path: object) -> str:
    """A path or name for a one-line message."""
    return one_line(str(path))


def escaped(message: str) -> str:
    """`message` with every character that is not printable escaped (`\\n`, `\\udcff`), so
    a file name holding a newline or bytes that are not UTF-8 cannot split or break it."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
