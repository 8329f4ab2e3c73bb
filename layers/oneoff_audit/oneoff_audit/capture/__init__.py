"""The capture agent: ``oneoff-audit record -- CMD`` and ``oneoff-audit flush-spool``.

The agent runs a one-off command in a PTY (interactive) or with separate pipes (non-interactive),
relays every byte between the user and the command, and records each byte with its time offset.

* :mod:`.relay`     spawns the command and relays bytes (PTY or pipes, signals, raw mode, resizes).
* :mod:`.recorder`  turns reads into events and seals them into chunks (size or age); the chunk
                    writer encodes chunks in order (hash chain) and counts what could not be stored.
* :mod:`.uploader`  background upload workers: bounded memory, retries with backoff and jitter,
                    spooling to disk when S3 is slow or down; the relay never waits for S3.
* :mod:`.spool`     the on-disk spool (atomic files, per-session locks, a size cap) and flush-spool.
* :mod:`.agent`     one recorded session from start to close marker.
* :mod:`.cli`       the ``record`` and ``flush-spool`` subcommands.
"""

from __future__ import annotations
