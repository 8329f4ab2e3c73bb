"""Benchmark: the assembler's throughput and peak RSS next to the pipeline limit and aws-encryption-cli.

One run, one moto server on loopback in its own process (S3 and KMS are remote services). For each
size (default 1 MiB, 100 MiB and 1 GiB of log), a session is staged the way a runner writes it
(1 MiB chunks, gzip level 6, hash chain, close marker), then, each in a fresh child process whose
peak RSS is read from ``/proc/self/status`` (VmHWM, reset before the work starts):

* **assembler**: :func:`oneoff_audit.assemble.assemble_session` (verify, stream, encrypt, multipart
  upload, manifest, index, cleanup);
* **(a) pipeline limit**: the staged objects read from S3 (same prefetching reader), passed through
  the Encryption SDK's streaming encryptor with the same suite and frame length and written by the
  same multipart upload, with no parsing or verification. Two variants: the raw gzip objects (what
  the issue describes; fewer bytes to encrypt than the log) and the same objects gunzipped (exactly
  as many bytes as the log);
* **(b) aws-encryption-cli --encrypt** of the plaintext log file (local file to local file, one KMS
  call; its process start-up is included).

Throughput is always log bytes (plaintext) per second. Target: assembler >= 0.6x pipeline limit,
peak RSS flat within +-10% across sizes and under 256 MB. ``--sizes`` takes MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers_staging: stage a session the way a runner does

APP = "bench"
SCRATCH = "bench-scratch"


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(mode: str, session_id: str, bucket: str, key_id: str) -> None:
    """Run one measured job in this (fresh) process; print a JSON report."""
    from oneoff_audit.aws import client
    from oneoff_audit.crypto import FRAME_LENGTH, encrypting_reader, sdk_client

    client("s3"), client("kms"), sdk_client()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    before = _status("VmRSS")
    started = time.monotonic()
    if mode == "assembler":
        from oneoff_audit.assemble import assemble_session
        from oneoff_audit.config import AssemblerConfig

        filed = assemble_session(AssemblerConfig.from_env(), APP, session_id)
        size = filed.plaintext_size
    else:
        from oneoff_audit.assemble import _PieceReader
        from oneoff_audit.multipart import MultipartUpload
        from oneoff_audit.staging import S3ChunkReader, list_session

        staged = list_session(bucket, APP, session_id, "staging/")
        chunks = [staged.chunks[seq] for seq in sorted(staged.chunks)]
        with S3ChunkReader(bucket) as reader:
            reader.expect(chunks)

            def pieces() -> Any:
                for chunk in chunks:
                    if mode == "pipeline-gunzip":
                        decomp = zlib.decompressobj(wbits=31)
                        for raw in reader.read_chunk(chunk):
                            yield decomp.decompress(raw)
                    else:
                        yield from reader.read_chunk(chunk)

            source = _PieceReader(pieces())
            with MultipartUpload(SCRATCH, f"{mode}/{session_id}", metadata={}, content_type="application/octet-stream",
                                 part_size=8 << 20) as upload:
                with encrypting_reader(source, key_id, APP, session_id) as encryptor:
                    while data := encryptor.read(FRAME_LENGTH):
                        upload.write(data)
                upload.complete()
        size = source.size
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "bytes": size, "before_mib": before / 1024,
                      "peak_mib": _status("VmHWM") / 1024}))


def run_child(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,100,1024", help="log sizes in MiB, comma separated")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SESSION", "BUCKET", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      POWERTOOLS_TRACE_DISABLED="true", POWERTOOLS_LOG_LEVEL="WARNING",
                      POWERTOOLS_SERVICE_NAME="oneoff-audit", POWERTOOLS_METRICS_NAMESPACE="OneoffAudit")
    os.environ.pop("AWS_PROFILE", None)
    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="bench-assemble-"))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        from helpers_staging import stage_synthetic

        from oneoff_audit.aws import client
        from oneoff_audit.crypto import decrypt_to_file
        from oneoff_audit.keys import log_key
        from oneoff_audit.provision import provision

        resources = provision("bench-audit", "bench-assembly")
        client("s3").create_bucket(Bucket=SCRATCH)
        env = {**os.environ, **resources.env()}
        rows = []
        for mib in (int(x) for x in args.sizes.split(",")):
            session_id = f"BENCH{mib}MIB"
            started = time.monotonic()
            stage_synthetic(resources.bucket, APP, session_id, mib << 20, compresslevel=6)
            staged_bytes = sum(o["Size"] for o in client("s3").list_objects_v2(
                Bucket=resources.bucket, Prefix=f"staging/{APP}/{session_id}/", MaxKeys=10000).get("Contents", []))
            print(f"staged {mib} MiB ({staged_bytes / 2**20:.1f} MiB of gzip) in {time.monotonic() - started:.1f} s",
                  flush=True)
            row: dict[str, Any] = {"mib": mib, "staged_mib": staged_bytes / 2**20}
            for mode in ("pipeline-raw", "pipeline-gunzip", "assembler"):
                row[mode] = run_child(env, mode, session_id, resources.bucket, resources.kms_key_id)
                client("s3").delete_object(Bucket=SCRATCH, Key=f"{mode}/{session_id}")
                print(f"  {mode}: {row[mode]}", flush=True)
            log_bytes = row["assembler"]["bytes"]
            plain = work / f"{session_id}.jsonl"
            body = client("s3").get_object(Bucket=resources.bucket, Key=log_key(APP, session_id))["Body"]
            decrypt_to_file(body, str(plain), resources.kms_key_id, APP, session_id)
            started = time.monotonic()
            subprocess.run(["aws-encryption-cli", "--encrypt", "-i", str(plain), "-o", str(plain) + ".enc", "-S",
                            "--wrapping-keys", f"key={resources.kms_key_id}", "--commitment-policy",
                            "require-encrypt-require-decrypt", "--algorithm", "AES_256_GCM_HKDF_SHA512_COMMIT_KEY",
                            "--frame-length", str(1 << 20), "--encryption-context", "purpose=oneoff-audit-log",
                            f"app={APP}", f"session_id={session_id}"],
                           env={**env, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},
                           check=True, capture_output=True)
            row["cli"] = {"seconds": time.monotonic() - started, "bytes": log_bytes}
            plain.unlink()
            Path(str(plain) + ".enc").unlink()
            rows.append(row)
            print(f"  aws-encryption-cli: {row['cli']}", flush=True)

        def rate(run: dict[str, Any], log_bytes: int) -> float:
            return log_bytes / run["seconds"] / 2**20

        print()
        print("| log MiB | staged gzip MiB | assembler MiB/s | (a) pipeline raw MiB/s | (a) pipeline gunzip MiB/s | "
              "(b) aws-encryption-cli MiB/s | assembler / (a) raw | assembler / (a) gunzip | "
              "assembler peak RSS MiB (above start) | pipeline peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            n = row["assembler"]["bytes"]
            ours, raw, gunz, cli = (rate(row[m], n) for m in ("assembler", "pipeline-raw", "pipeline-gunzip", "cli"))
            a = row["assembler"]
            growth = a["peak_mib"] - a["before_mib"]
            print(f"| {n / 2**20:.1f} | {row['staged_mib']:.1f} | {ours:.1f} | {raw:.1f} | {gunz:.1f} | {cli:.1f} | "
                  f"{ours / raw:.2f} | {ours / gunz:.2f} | {a['peak_mib']:.0f} ({growth:.0f}) | "
                  f"{row['pipeline-gunzip']['peak_mib']:.0f} |")
        print("\nceiling: the log is JSON Lines, not gzip, so every assembler encrypts and uploads the decompressed "
              "bytes; the pipeline fed exactly those bytes, with no parsing or verification at all, runs at")
        for row in rows:
            n = row["assembler"]["bytes"]
            ceiling = rate(row["pipeline-gunzip"], n) / rate(row["pipeline-raw"], n)
            print(f"  {n / 2**20:.1f} MiB: {ceiling:.2f}x the raw pipeline (the assembler: "
                  f"{rate(row['assembler'], n) / rate(row['pipeline-raw'], n):.2f}x)")
        peaks = [row["assembler"]["peak_mib"] for row in rows if row["mib"] >= 100]
        if len(peaks) >= 2:
            spread = (max(peaks) - min(peaks)) / min(peaks)
            print(f"\nassembler peak RSS across sizes >= 100 MiB: {min(peaks):.0f}..{max(peaks):.0f} MiB "
                  f"(spread {spread:.1%}; target within 10% and under 256 MiB)")
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
