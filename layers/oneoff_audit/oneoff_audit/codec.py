"""Exact bytes in JSON: valid UTF-8 stays readable text, anything else is base64, nothing is lost.

A captured read becomes one or more *data* values:

* a JSON string when the bytes are valid UTF-8 (so ``grep`` and ``jq`` find what was typed), or
* ``{"b64": "..."}`` holding the bytes that are not valid UTF-8.

:class:`Utf8Splitter` is fed each read of a stream in turn. It holds back the (at most 3) bytes of
a multi-byte character cut by the end of a read, and prepends them to the next read, so that a
character split across reads, or across chunks, is still written once and whole. ``flush()``
releases what is held (as base64 when it never completed).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from typing import Any

from oneoff_audit.errors import FormatError

Data = str | dict[str, str]


def _incomplete_tail(buf: bytes) -> int:
    """How many trailing bytes of ``buf`` are the start of a character that may still complete."""
    n = len(buf)
    for back in range(1, min(3, n) + 1):
        b = buf[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: look further back for the lead byte
            continue
        if b & 0xE0 == 0xC0:
            need = 2
        elif b & 0xF0 == 0xE0:
            need = 3
        elif b & 0xF8 == 0xF0:
            need = 4
        else:
            return 0
        if back >= need:
            return 0
        # Only hold back a prefix that is itself still valid (else it can never complete).
        try:
            (buf[n - back:] + b"\x80" * (need - back)).decode("utf-8")
        except UnicodeDecodeError:
            return 0
        return back
    return 0


def encode_bytes(data: bytes) -> list[Data]:
    """Split ``data`` into data values: maximal valid UTF-8 runs as str, invalid runs as base64."""
    out: list[Data] = []
    pos = 0
    n = len(data)
    while pos < n:
        try:
            out.append(data[pos:].decode("utf-8"))
            return out
        except UnicodeDecodeError as err:
            if err.start:
                out.append(data[pos:pos + err.start].decode("utf-8"))
            bad_start = pos + err.start
            bad_end = pos + err.end
            # Extend the invalid run over consecutive undecodable bytes.
            while bad_end < n:
                try:
                    data[bad_end:bad_end + 4].decode("utf-8")
                    break
                except UnicodeDecodeError as nxt:
                    if nxt.start != 0:
                        break
                    bad_end += nxt.end
            out.append({"b64": base64.b64encode(data[bad_start:bad_end]).decode("ascii")})
            pos = bad_end
    return out


def decode_data(value: Any, where: str = "event", field: str = "data") -> bytes:
    """Inverse of :func:`encode_bytes` for one value; raises FormatError on anything else."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise FormatError(where, field, "string holds a lone surrogate (not valid UTF-8 text)") from err
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise FormatError(where, field + ".b64", "not valid base64") from err
    raise FormatError(where, field, 'must be a string or {"b64": "<base64>"}')


def join_data(values: Iterable[Any]) -> bytes:
    """Concatenate the bytes of several data values."""
    return b"".join(decode_data(v) for v in values)


class Utf8Splitter:
    """Incremental encoder for one stream that never splits a multi-byte character."""

    def __init__(self) -> None:
        self._held = b""

    @property
    def held(self) -> int:
        """Bytes currently held back, waiting for the rest of a character."""
        return len(self._held)

    def feed(self, data: bytes) -> list[Data]:
        """Encode ``data`` (after any held bytes), holding back an incomplete trailing character."""
        buf = self._held + data
        keep = _incomplete_tail(buf)
        self._held = buf[len(buf) - keep:] if keep else b""
        body = buf[: len(buf) - keep] if keep else buf
        return encode_bytes(body) if body else []

    def flush(self) -> list[Data]:
        """Release held bytes (they never completed a character, so they come out as base64)."""
        held, self._held = self._held, b""
        return encode_bytes(held) if held else []


def iter_encoded(chunks: Iterable[bytes]) -> Iterator[Data]:
    """Encode a sequence of reads of one stream as a splitter would (for tests and tools)."""
    splitter = Utf8Splitter()
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.flush()
