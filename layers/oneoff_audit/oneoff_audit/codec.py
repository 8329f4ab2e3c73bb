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
import re
from collections.abc import Iterable, Iterator
from typing import Any

from oneoff_audit.errors import FormatError

Data = str | dict[str, str]

_LOWEST_SECOND = {0xE0: 0xA0, 0xF0: 0x90}  # lowest valid second byte after these lead bytes
_ESCAPED_RUN = re.compile("([\udc80-\udcff]+)")  # bytes that surrogateescape could not decode


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
        # Only hold back a prefix that is itself still valid (else it can never complete). A lone
        # lead byte is completed with the lowest continuation byte it allows: E0 needs A0..BF and
        # F0 needs 90..BF (80 would make them overlong, so padding with 80 would wrongly reject them).
        pad_first = _LOWEST_SECOND.get(b, 0x80) if back == 1 else 0x80
        pad = bytes([pad_first]) + b"\x80" * (need - back - 1)
        try:
            (buf[n - back:] + pad).decode("utf-8")
        except UnicodeDecodeError:
            return 0
        return back
    return 0


def encode_bytes(data: bytes) -> list[Data]:
    """Split ``data`` into data values: maximal valid UTF-8 runs as str, invalid runs as base64."""
    if not data:
        return []
    try:
        return [data.decode("utf-8")]
    except UnicodeDecodeError:
        pass
    # One linear pass: every byte that is not part of a valid character becomes a lone surrogate
    # U+DC80..U+DCFF (valid UTF-8 never decodes to those), so the runs split apart unambiguously.
    out: list[Data] = []
    for index, part in enumerate(_ESCAPED_RUN.split(data.decode("utf-8", "surrogateescape"))):
        if not part:
            continue
        if index % 2:
            out.append({"b64": base64.b64encode(part.encode("utf-8", "surrogateescape")).decode("ascii")})
        else:
            out.append(part)
    return out


def decode_data(value: Any, where: str = "event", field: str = "data") -> bytes:
    """Inverse of :func:`encode_bytes` for one value; raises FormatError on anything else."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise FormatError(where, field, "string holds a lone surrogate (not valid UTF-8 text)") from err
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        text = value["b64"]
        try:
            if len(text) % 4:  # b64decode tolerates excess padding ("AAAA="); the schema does not
                raise ValueError("length is not a multiple of 4")
            return base64.b64decode(text, validate=True)
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

    def take(self, data: bytes) -> bytes:
        """Held bytes + ``data``, minus an incomplete trailing character (held back for the next read)."""
        buf = self._held + data if self._held else data
        keep = _incomplete_tail(buf)
        if keep:
            self._held = buf[len(buf) - keep:]
            return buf[: len(buf) - keep]
        self._held = b""
        return buf

    def feed(self, data: bytes) -> list[Data]:
        """Encode ``data`` (after any held bytes), holding back an incomplete trailing character."""
        body = self.take(data)
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
