"""Exports of a (decrypted) audit log: asciicast v2 for replay, and the raw bytes of chosen streams.

**asciicast v2** (``asciinema play``/``cat``, asciinema-player): a header line (terminal size from
the session's initial size, start timestamp, command, title) then ``[t, code, data]`` events:
stdout and stderr as ``"o"`` (a terminal shows both), stdin as ``"i"``, resizes as ``"r"`` and
markers as ``"m"`` with a readable label. asciicast holds text, so each stream's bytes go through
an incremental UTF-8 decoder with replacement, exactly as asciinema's own recorder does: valid
UTF-8 output (also a character split across reads) is reproduced byte for byte, and an invalid
byte shows as U+FFFD. The audit log itself keeps the exact bytes.

**text**: the exact bytes of the selected streams (default stdout and stderr) in event order,
that is what the terminal received; ``cat`` it to see the session.
"""

from __future__ import annotations

import codecs
import io
import json
import shlex
from collections.abc import Iterable, Iterator
from typing import IO, Any

from oneoff_audit import formats
from oneoff_audit.codec import decode_data

DEFAULT_SIZE = (80, 24)
_CAST_CODE = {"o": "o", "e": "o", "i": "i"}


# Line separators other than "\n" stay escaped, so that a reader splitting on any of them (Python's
# str.splitlines, some JavaScript) still sees one event per line.
_SEPARATORS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).translate(_SEPARATORS) + "\n"


def _marker_label(data: dict[str, Any]) -> str:
    details = " ".join(f"{k}={json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
                       for k, v in data.items() if k != "kind")
    return f"{data['kind']} {details}".strip()


def asciicast_header(header: dict[str, Any]) -> dict[str, Any]:
    """The asciicast v2 header line for a log header."""
    size = header["command"].get("term_size") or {}
    cols = size.get("cols") or DEFAULT_SIZE[0]
    rows = size.get("rows") or DEFAULT_SIZE[1]
    argv = [decode_data(a).decode("utf-8", "replace") for a in header["command"]["argv"]]
    return {
        "version": 2,
        "width": cols,
        "height": rows,
        "timestamp": int(formats.parse_time(header["started_at"]).timestamp()),
        "command": shlex.join(argv),
        "title": f"{header['app']} {header['session_id']} ({header['actor']['id']})",
    }


def iter_asciicast(lines: Iterable[tuple[str, Any]]) -> Iterator[str]:
    """asciicast v2 lines from ``formats.iter_log_lines`` output (header first)."""
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("o", "e", "i")}
    last_t = 0.0
    for kind, value in lines:
        if kind == "header":
            yield _line(asciicast_header(value))
        elif kind == "event":
            t, stream, data = value
            last_t = max(last_t, float(t))
            if stream in decoders:
                text = decoders[stream].decode(decode_data(data))
                if text:
                    yield _line([t, _CAST_CODE[stream], text])
            elif stream == "r":
                yield _line([t, "r", data])
            else:
                yield _line([t, "m", _marker_label(data)])
    for stream, decoder in decoders.items():
        rest = decoder.decode(b"", final=True)
        if rest:
            yield _line([last_t, _CAST_CODE[stream], rest])


def write_asciicast(src: IO[bytes], out: IO[str]) -> None:
    """Write the asciicast v2 export of the plaintext log read from ``src``."""
    for line in iter_asciicast(formats.iter_log_lines(src)):
        out.write(line)


def asciicast_bytes(plaintext: bytes) -> bytes:
    """The asciicast v2 export of a whole plaintext log, UTF-8."""
    out = io.StringIO()
    write_asciicast(io.BytesIO(plaintext), out)
    return out.getvalue().encode("utf-8")


def write_text(src: IO[bytes], out: IO[bytes], streams: str = "oe") -> int:
    """Write the exact bytes of ``streams`` (any of ``i``, ``o``, ``e``) in event order; returns the count."""
    total = 0
    for kind, value in formats.iter_log_lines(src):
        if kind == "event" and value[1] in streams and value[1] in formats.BYTE_STREAMS:
            data = decode_data(value[2])
            out.write(data)
            total += len(data)
    return total
