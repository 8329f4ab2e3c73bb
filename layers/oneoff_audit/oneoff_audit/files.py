"""Files that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def replace_when_done(dest: str, suffix: str = ".partial") -> Iterator[IO[bytes]]:
    """A binary file beside ``dest`` that becomes ``dest`` only if the ``with`` block ends without error.

    Checks that must pass before the result may exist (a message authenticated, a hash matched)
    belong inside the block: on any exception the temporary file is removed and ``dest`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(prefix=".oneoff-audit-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
