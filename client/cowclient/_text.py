"""How records are printed: the prototype's line format, binary-safe."""

from __future__ import annotations

_NAMED = {0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def escape(data: bytes) -> str:
    """Printable ASCII as is, everything else as a backslash escape."""
    return "".join(
        _NAMED.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}") for b in data
    )


def record_line(offset: int, data: bytes) -> str:
    return f"Offset: {offset}, Length: {len(data)}, Data: {escape(data)}"
