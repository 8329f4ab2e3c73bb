"""Benchmark of the capture agent against script(1) and a plain pipe, in one run on the same workload.

Measured (each ratio against a baseline measured in the same run):

* relay throughput for SIZE bytes of output (default 1 GiB) through a PTY:
  ``oneoff-audit record --tty always -- CMD`` vs ``script -q -B FILE -c CMD`` vs ``CMD | cat`` (no PTY);
  wall time of the whole run (agent start-up and final uploads included) and, for the agent, the
  relay phase alone (command start to command end, from its log);
* keystroke round trip (p50/p99) through ``record`` and through ``script`` around a raw-mode echo
  program, minus the same program run directly on the PTY ("added latency");
* the agent's peak RSS (VmHWM, sampled) during the throughput run.

S3 is the embedded moto server on loopback (started here), so uploads are real HTTP PUTs.

    .venv/bin/python bench/capture.py [--size 1G] [--workload logs|yes] [--keystrokes 400] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import pty
import random
import re
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "oneoff-audit")
ECHO = ("import os, tty\ntty.setraw(0)\nos.write(1, b'READY')\n"
        "while True:\n    b = os.read(0, 1024)\n    os.write(1, b)\n    if b'q' in b:\n        break\n")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def start_stack() -> dict[str, str]:
    """A moto server on 127.0.0.1 with the provisioned resources; returns the agent's environment."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.disable(logging.CRITICAL)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    from oneoff_audit.aws import reset_clients
    from oneoff_audit.provision import provision

    reset_clients()
    resources = provision(bucket="bench-capture", queue_name="bench-capture")
    return {**os.environ, **resources.env()}


def make_workload(kind: str, size: int, workdir: Path) -> str:
    """A shell command writing exactly ``size`` bytes of output."""
    if kind == "yes":
        return f"yes 'the quick brown fox jumps over the lazy dog 0123456789' | head -c {size}"
    rng = random.Random(7)
    paths = ["/api/v1/items", "/api/v1/users", "/healthz", "/api/v2/orders", "/static/app.js"]
    lines = []
    total = 0
    while total < 32 << 20:
        line = (f"2026-11-25T14:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999999):06d}Z "
                f"{rng.choice(['INFO', 'INFO', 'INFO', 'WARN', 'DEBUG'])} worker-{rng.randint(1, 32)} "
                f"req={rng.getrandbits(64):016x} {rng.choice(['GET', 'POST', 'PUT'])} {rng.choice(paths)}/"
                f"{rng.randint(1, 99999)} status={rng.choice([200, 200, 200, 201, 404, 500])} "
                f"bytes={rng.randint(0, 99999)} ms={rng.random() * 300:.1f} user=\u00fc{rng.randint(1, 999)}\n")
        lines.append(line)
        total += len(line.encode())
    path = workdir / "workload.log"
    path.write_text("".join(lines), encoding="utf-8")
    repeats = size // path.stat().st_size + 1
    return f"for i in $(seq {repeats}); do cat {path}; done | head -c {size}"


class RssSampler(threading.Thread):
    """Peak VmHWM of a process, sampled until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self.samples = 0

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while True:
            try:
                with open(path) as status:
                    text = status.read()
            except OSError:
                return
            match = re.search(r"VmHWM:\s+(\d+) kB", text)
            if match is None:  # zombie
                return
            self.peak_kb = max(self.peak_kb, int(match.group(1)))
            self.samples += 1
            time.sleep(0.02)


def own_cpu() -> float:
    """CPU seconds of this process so far: the embedded S3 server (moto) runs in its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str], sample_rss: bool = False) -> tuple[float, float, int, float]:
    """Wall seconds, CPU seconds (process and its children), peak RSS (kB, if sampled) of one run, and
    the CPU seconds this process (the S3 server) spent meanwhile."""
    server_cpu = own_cpu()
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    sampler = RssSampler(proc.pid) if sample_rss else None
    if sampler:
        sampler.start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed with {proc.returncode}")
    if sampler:
        sampler.join(1)
    return wall, usage.ru_utime + usage.ru_stime, sampler.peak_kb if sampler else 0, own_cpu() - server_cpu


def relay_seconds(log: Path) -> float:
    """Command start to command end of the agent's last session, from its log."""
    from oneoff_audit.formats import parse_time

    started = ended = None
    for line in log.read_text().splitlines():
        stamp, _, message = line.partition(" ")
        if " started pid " in message:
            started = parse_time(stamp)
        elif message.startswith("command ended"):
            ended = parse_time(stamp)
    assert started is not None and ended is not None, "agent log without start/end"
    return (ended - started).total_seconds()


ENTRIES = {"record": [CLI], "record-m": [sys.executable, "-m", "oneoff_audit.capture"]}


def throughput(cmd: str, size: int, env: dict[str, str], workdir: Path, repeat: int) -> dict[str, list]:
    results: dict[str, list] = {"direct": [], "script": [], "record": [], "record-m": []}
    relay: dict[str, list] = {"record": [], "record-m": []}
    log = workdir / "agent.log"
    for _ in range(repeat):
        results["direct"].append(timed(["sh", "-c", f"{cmd} | cat >/dev/null"], env))
        results["script"].append(timed(["script", "-q", "-B", str(workdir / "script.log"), "-c", cmd], env))
        (workdir / "script.log").unlink(missing_ok=True)
        for name, entry in ENTRIES.items():
            results[name].append(timed([*entry, "record", "--app", "bench", "--actor-id", "bench", "--tty", "always",
                                        "--spool-dir", str(workdir / "spool"), "--log-file", str(log), "--",
                                        "sh", "-c", cmd], env, sample_rss=True))
            relay[name].append(relay_seconds(log))
    results["relay"] = relay
    return results


def keystrokes(argv: list[str], env: dict[str, str], count: int) -> list[float]:
    """Round-trip times (ms) of single keystrokes through ``argv`` running on a fresh PTY."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(["setsid", "-c", *argv], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)

    def roundtrip(byte: bytes, timeout: float) -> float | None:
        start = time.perf_counter()
        os.write(master, byte)
        deadline = start + timeout
        got = b""
        while byte not in got:
            left = deadline - time.perf_counter()
            if left <= 0 or not select.select([master], [], [], left)[0]:
                return None
            got += os.read(master, 1024)
        return (time.perf_counter() - start) * 1000

    screen = b""
    deadline = time.monotonic() + 30
    while b"READY" not in screen:  # the echo program is up and its terminal raw
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{argv[:3]} did not start")
        if select.select([master], [], [], 0.1)[0]:
            screen += os.read(master, 1024)
    times = []
    for n in range(count):
        key = bytes([97 + n % 16])  # a..p, never 'q'
        rtt = roundtrip(key, 5)
        if rtt is None:
            raise SystemExit("keystroke lost")
        times.append(rtt)
        time.sleep(0.005 + random.random() * 0.01)
    os.write(master, b"q")
    proc.wait(timeout=60)
    os.close(master)
    return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="bytes of output (1G)")
    parser.add_argument("--workload", choices=("logs", "yes"), default="logs")
    parser.add_argument("--keystrokes", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("script") is None:
        raise SystemExit("script(1) (util-linux) is required")
    env = start_stack()
    workdir = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    try:
        cmd = make_workload(args.workload, args.size, workdir)
        load = os.getloadavg()
        print(f"workload: {args.workload}, {args.size / (1 << 20):.0f} MiB through a PTY; "
              f"{os.cpu_count()} CPUs, load average {load[0]:.2f}")
        res = throughput(cmd, args.size, env, workdir, args.repeat)
        mib = args.size / (1 << 20)
        names = ("direct", "script", "record", "record-m")
        med = {k: statistics.median(v[0] for v in res[k]) for k in names}
        cpu = {k: statistics.median(v[1] for v in res[k]) for k in names}
        rss = {k: max(v[2] for v in res[k]) / 1024 for k in ("record", "record-m")}
        relay = {k: statistics.median(v) for k, v in res["relay"].items()}
        print("\nthroughput (wall time of the whole run incl. agent start-up and last uploads; "
              "CPU = process and children)")
        labels = {"direct": "CMD | cat", "script": "script", "record": "oneoff-audit record",
                  "record-m": "python -m oneoff_audit.capture record"}
        for name in names:
            extra = f"  relay phase {mib / relay[name]:6.1f} MiB/s  peak RSS {rss[name]:5.1f} MB" if name in rss else ""
            print(f"  {labels[name]:<38} {med[name]:7.2f} s {mib / med[name]:7.1f} MiB/s  cpu {cpu[name]:6.2f} s"
                  + extra)
        ratio = med["script"] / med["record"]
        ratio_m = med["script"] / med["record-m"]
        print(f"  record vs script: {ratio:.2f}x (python -m: {ratio_m:.2f}x; relay phase alone: "
              f"{med['script'] / relay['record']:.2f}x)   record vs plain pipe: {med['direct'] / med['record']:.3f}x")
        server = statistics.median(v[3] for v in res["record"])
        cpus = os.cpu_count() or 1
        floor = (cpu["script"] + server) / cpus
        print(f"  S3 server (moto, in this process) during record: cpu {server:.2f} s "
              f"({server / mib * 1000:.1f} ms/MiB); agent's own cpu {cpu['record'] - cpu['script']:.2f} s more than "
              f"script's ({(cpu['record'] - cpu['script']) / mib * 1000:.1f} ms/MiB)")
        print(f"  ceiling on this machine: even an agent costing no more CPU than script, plus the S3 server's "
              f"work, needs >= ({cpu['script']:.2f} + {server:.2f}) / {cpus} CPUs = {floor:.2f} s: "
              f"at best {med['script'] / max(med['script'], floor):.2f}x script")
        peak = rss["record"]

        print(f"\nkeystroke round trip, {args.keystrokes} keys (ms)")
        echo = workdir / "echo.py"
        echo.write_text(ECHO)
        lat = {
            "direct": keystrokes([sys.executable, str(echo)], env, args.keystrokes),
            "script": keystrokes(["script", "-q", "-B", str(workdir / "keys.log"), "-c",
                                  f"{sys.executable} {echo}"], env, args.keystrokes),
            "record": keystrokes([CLI, "record", "--app", "bench", "--actor-id", "bench", "--spool-dir",
                                  str(workdir / "spool"), "--", sys.executable, str(echo)], env, args.keystrokes),
        }
        for name, values in lat.items():
            print(f"  {name:<8} p50 {pct(values, 50):6.3f}  p99 {pct(values, 99):6.3f}  max {max(values):6.3f}")
        added50 = pct(lat["record"], 50) - pct(lat["direct"], 50)
        added99 = pct(lat["record"], 99) - pct(lat["direct"], 99)
        s_added99 = pct(lat["script"], 99) - pct(lat["direct"], 99)
        print(f"  added by record: p50 {added50:.3f} ms, p99 {added99:.3f} ms   (script adds p99 {s_added99:.3f} ms)")

        print("\ntargets")
        print(f"  throughput >= 1.0x script: {ratio:.2f}x {'PASS' if ratio >= 1.0 else 'FAIL'}")
        print(f"  p99 added echo latency < 1 ms: {added99:.3f} ms {'PASS' if added99 < 1.0 else 'FAIL'}")
        print(f"  agent RSS < 64 MB: oneoff-audit record {peak:.1f} MB {'PASS' if peak < 64 else 'FAIL'}, "
              f"python -m oneoff_audit.capture {rss['record-m']:.1f} MB {'PASS' if rss['record-m'] < 64 else 'FAIL'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
