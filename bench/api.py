"""Benchmark: inline log response time of the API next to the bare S3 GET + KMS Decrypt of the same object.

One run, one moto server on loopback (in its own process, as S3 and KMS are remote services): a
session of about ``--size`` bytes of plaintext (just under the 1 MiB inline limit by default) is
filed by the real assembler; then, interleaved so drift hits all alike, ``--rounds`` times each:

* **api (HTTP)**: ``GET /apps/{app}/sessions/{session}/log`` over real HTTP through the local bridge
  into the real handler (manifest read, ciphertext GET, KMS Decrypt, hash and context checks, JSON
  body, access record PUT);
* **api (handler)**: the same request as a proxy event straight into the handler (no HTTP);
* **baseline**: one ``s3.get_object`` of the same object version plus one Encryption SDK decrypt of
  it (one KMS Decrypt), the floor any inline delivery pays.

Prints p50/p99 (warm: the first ``--warmup`` rounds are dropped) and the ratios; target: api p50 <= 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers_staging: stage a session the way a runner does


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="approximate plaintext bytes of the log")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--moto", choices=("process", "thread"), default="process",
                        help="moto in its own process (default, like remote services) or in a thread of this one")
    args = parser.parse_args()

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      POWERTOOLS_TRACE_DISABLED="true", POWERTOOLS_LOG_LEVEL="WARNING",
                      POWERTOOLS_SERVICE_NAME="oneoff-audit")
    os.environ.pop("AWS_PROFILE", None)
    if args.moto == "thread":  # in this process: the API and moto then share one GIL
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, bound = server.get_host_and_port()
        os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{bound}"
        try:
            return run(args)
        finally:
            server.stop()
    # moto in its own process, like a remote service
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return run(args)
    finally:
        moto.terminate()
        moto.wait(timeout=10)


def run(args: argparse.Namespace) -> int:
    import helpers_staging as staging

    from oneoff_audit import crypto
    from oneoff_audit.api.httpbridge import build_event, serve
    from oneoff_audit.assemble import assemble_session
    from oneoff_audit.aws import client
    from oneoff_audit.config import AssemblerConfig
    from oneoff_audit.local import load_handler
    from oneoff_audit.provision import provision

    res = provision(bucket=f"bench-api-{uuid.uuid4().hex[:8]}", queue_name=f"bench-{uuid.uuid4().hex[:8]}")
    os.environ.update(res.env())
    line = "ls -la /srv/app && echo 'caf\u00e9 \u20ac' && printf '%s\\n' status ok\r\n"
    event_bytes = len(json.dumps([10.123, "o", line], ensure_ascii=False, separators=(",", ":")).encode()) + 1
    per_chunk = max(1, (args.size - 2000) // event_bytes // 4)
    batches = [staging.output_events([line] * per_chunk, start=n * 10.0, step=0.001) for n in range(4)]
    chunks = staging.build_chunks("bench", "S1", batches)
    staging.stage(res.bucket, chunks)
    filed = assemble_session(AssemblerConfig.from_env(), "bench", "S1")
    print(f"log: plaintext {filed.plaintext_size} bytes, ciphertext {filed.ciphertext_size} bytes, "
          f"{filed.event_count} events", flush=True)
    if filed.plaintext_size > (1 << 20):
        print("the log is above the 1 MiB inline limit: lower --size", file=sys.stderr)
        return 2

    tokens = {"bench": {"sub": "bench", "custom:audit_apps": "*"}}
    handler = load_handler("api")
    server = serve(handler, "127.0.0.1", 0, tokens)
    url = f"{server.url}/apps/bench/sessions/S1/log"
    request = urllib.request.Request(url, headers={"Authorization": "Bearer bench"})
    event = build_event("GET", "/apps/bench/sessions/S1/log", [("Authorization", "Bearer bench")], b"",
                        "127.0.0.1", tokens)

    class Ctx:
        function_name, memory_limit_in_mb, aws_request_id = "bench", 1024, "bench"
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"

        def get_remaining_time_in_millis(self) -> int:
            return 29_000

    s3 = client("s3")
    provider = crypto.key_provider(res.kms_key_id)

    def api_http() -> int:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return len(resp.read())

    with urllib.request.urlopen(request, timeout=30) as resp:  # checked once, outside the timings
        assert json.loads(resp.read())["trailer"]["event_count"] == filed.event_count

    def api_handler() -> int:
        resp = handler(event, Ctx())
        assert resp["statusCode"] == 200
        return len(resp["body"])

    def baseline() -> int:
        ciphertext = s3.get_object(Bucket=res.bucket, Key=filed.log_key, VersionId=filed.log_version_id)["Body"].read()
        plaintext, _ = crypto.sdk_client().decrypt(source=ciphertext, key_provider=provider)
        return len(plaintext)

    timings: dict[str, list[float]] = {"api (HTTP)": [], "api (handler)": [], "baseline": []}
    funcs = {"api (HTTP)": api_http, "api (handler)": api_handler, "baseline": baseline}
    try:
        for round_no in range(args.rounds + args.warmup):
            for name, func in funcs.items():
                start = time.perf_counter()
                func()
                elapsed = (time.perf_counter() - start) * 1000
                if round_no >= args.warmup:
                    timings[name].append(elapsed)
    finally:
        server.shutdown()
    base50 = statistics.median(timings["baseline"])
    base99 = percentile(timings["baseline"], 99)
    print(f"{'':16}{'p50 ms':>10}{'p99 ms':>10}{'p50 x base':>12}{'p99 x base':>12}   "
          f"({args.rounds} warm rounds, moto in a {args.moto})")
    for name, values in timings.items():
        p50, p99 = statistics.median(values), percentile(values, 99)
        print(f"{name:16}{p50:10.1f}{p99:10.1f}{p50 / base50:12.2f}{p99 / base99:12.2f}")
    ratio = statistics.median(timings["api (HTTP)"]) / base50
    print(f"target: inline p50 <= 2.0x baseline: {'met' if ratio <= 2.0 else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
