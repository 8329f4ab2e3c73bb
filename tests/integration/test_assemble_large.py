"""A session of more than 200 MB is filed with a peak memory that does not grow with its size.

Each assembly runs in a child process (the moto server, which keeps whole objects in memory, stays
in this one), which reports its RSS before assembling and its peak RSS while assembling. A 48 MB and
a 210 MB session (both past the few parts it takes the upload pipeline to fill) are compared: the
peak above the baseline must be the same within 10% (+4 MiB of allocator noise), and under 256 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers_staging import expected_trailer_line, log_versions, stage_synthetic, staged_keys

from oneoff_audit import keys

pytestmark = pytest.mark.integration

APP = "bulk"

# VmHWM (the peak RSS of this process image) rather than ru_maxrss, which a child inherits from the
# parent it was forked from; writing 5 to clear_refs resets the peak to the current RSS.
CHILD = textwrap.dedent("""
    import json, sys, time
    from oneoff_audit.assemble import assemble_session
    from oneoff_audit.aws import client
    from oneoff_audit.config import AssemblerConfig
    from oneoff_audit.crypto import sdk_client

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    config = AssemblerConfig.from_env()
    client("s3"), client("kms"), sdk_client()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    started = time.monotonic()
    filed = assemble_session(config, sys.argv[1], sys.argv[2])
    print(json.dumps({"before_kib": before, "peak_kib": status("VmHWM"), "seconds": time.monotonic() - started,
                      "filed": filed.to_dict()}))
""")


def assemble_in_child(stack, sid: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, APP, sid], env={**stack.env(), "POWERTOOLS_LOG_LEVEL":
                            "WARNING"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_session_size(stack):
    runs = {}
    for sid, size in (("SMALL48MB", 48 << 20), ("LARGE210MB", 210 << 20)):
        staged = stage_synthetic(stack.bucket, APP, sid, size)
        report = assemble_in_child(stack, sid)
        filed = report["filed"]
        trailer = expected_trailer_line(staged, filed["filed_at"])
        expected = staged.body_sha256.copy()
        expected.update(trailer)
        assert filed["plaintext_sha256"] == expected.hexdigest()  # byte-exact, without decrypting 200 MB
        assert filed["plaintext_size"] == staged.body_size + len(trailer)
        assert filed["complete"] is True and filed["event_count"] == staged.events
        assert len(log_versions(stack.bucket, keys.log_key(APP, sid))) == 1
        assert staged_keys(stack.bucket, APP, sid) == []
        runs[sid] = (filed["plaintext_size"], (report["peak_kib"] - report["before_kib"]) / 1024,
                     report["peak_kib"] / 1024, report["seconds"])
        print(f"{sid}: {filed['plaintext_size'] / 1e6:.0f} MB in {report['seconds']:.1f} s, "
              f"peak RSS {report['peak_kib'] / 1024:.0f} MiB ({runs[sid][1]:.0f} MiB above the imports)")
    (small_size, small_growth, _, _), (large_size, large_growth, large_peak, _) = runs.values()
    assert large_size > 200_000_000 and large_size > 4 * small_size
    assert large_growth <= small_growth * 1.10 + 4, runs  # flat: not proportional to size
    assert large_peak < 256, runs
