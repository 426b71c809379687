"""What the command line prints of users' text."""

from __future__ import annotations


def terminal_safe(text: str) -> str:
    """``text`` with control characters escaped: file and folder names come from users, and an escape
    sequence in one would otherwise reach the terminal (retitle it, clear it, hide the lines above)."""
    return "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in text)
