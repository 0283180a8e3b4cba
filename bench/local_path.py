#!/usr/bin/env python3
"""Measure the local path: one sendmail call, runq over 1,000 messages, 200 calls + delivery.

Usage: .venv/bin/python bench/local_path.py [--rounds N]

Each figure is the median of N rounds (default 5) in a fresh folder made by
masq-setup under a temporary directory.  Every delivery is fsynced (maildir).
Prints a Markdown table for bench/README.md.
"""
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
BODY = (b"x" * 76 + b"\n") * 52          # 4 KiB of body


def setup(folder, hostname="bench.example"):
    """A masq-setup local-only folder; the environment its programs run with."""
    subprocess.run([f"{BIN}/masq-setup", "local-only", folder, "--hostname", hostname],
                   check=True, capture_output=True)
    return {"PATH": f"{BIN}:/usr/bin:/bin", "MASQ_CONF": f"{folder}/masq.toml",
            "HOME": os.environ.get("HOME", "/")}


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv, env, stdin=b""):
    cpu0, t0 = children_cpu(), time.perf_counter()
    subprocess.run(argv, input=stdin, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0, children_cpu() - cpu0


def fill(env, count, rcpt="bob@localhost"):
    """Queue `count` 4-KiB messages with the library (not timed)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
    os.environ["MASQ_CONF"] = env["MASQ_CONF"]
    from masq import config, envelope
    from masq.handoff import enqueue
    import io
    conf = config.load(env["MASQ_CONF"])
    for i in range(count):
        msg = b"Subject: bench %d\nFrom: a@bench.example\n\n" % i + BODY
        enqueue(conf, io.BytesIO(msg), envelope.Envelope("a@bench.example", [rcpt]),
                {"proto": "local", "user": "bench"})


def sendmail_call(rounds):
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as d:
        env = setup(f"{d}/m")
        msg = b"Subject: one\n\n" + BODY
        sendmail = f"{d}/m/bin/sendmail"
        for _ in range(5):
            timed([sendmail, "-odq", "bob"], env, msg)          # warm caches
        for _ in range(rounds * 10):
            wall, cpu = timed([sendmail, "-odq", "bob"], env, msg)
            walls.append(wall)
            cpus.append(cpu)
        python = [timed([sys.executable, "-I", "-S", "-c", "pass"], env)[0]
                  for _ in range(rounds * 10)]
    return statistics.median(walls), statistics.median(cpus), statistics.median(python)


def runq_1000(rounds):
    rates, cpu_ms = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            env = setup(f"{d}/m")
            fill(env, 1000)
            wall, cpu = timed([f"{BIN}/masq-send", "--once"], env)
            assert len(os.listdir(f"{d}/m/mail/bob/new")) == 1000
            rates.append(1000 / wall)
            cpu_ms.append(cpu * 1000 / 1000)
    return statistics.median(rates), statistics.median(cpu_ms)


def calls_200(rounds):
    call_rates, total_rates = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            env = setup(f"{d}/m")
            msg = b"Subject: call\n\n" + BODY
            t0 = time.perf_counter()
            for _ in range(200):
                subprocess.run([f"{d}/m/bin/sendmail", "-odq", "bob"], input=msg, env=env,
                               check=True, capture_output=True)
            t1 = time.perf_counter()
            subprocess.run([f"{d}/m/bin/runq"], env=env, check=True, capture_output=True)
            t2 = time.perf_counter()
            assert len(os.listdir(f"{d}/m/mail/bob/new")) == 200
            call_rates.append(200 / (t1 - t0))
            total_rates.append(200 / (t2 - t0))
    return statistics.median(call_rates), statistics.median(total_rates)


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    wall, cpu, python = sendmail_call(rounds)
    rate, cpu_ms = runq_1000(rounds)
    call_rate, total_rate = calls_200(rounds)
    print("| what | median |")
    print("| --- | --- |")
    print(f"| one `sendmail -odq` call, wall | {wall * 1000:.1f} ms |")
    print(f"| one `sendmail -odq` call, CPU (user+sys) | {cpu * 1000:.1f} ms |")
    print(f"| bare `python3 -I -S -c pass`, wall | {python * 1000:.1f} ms |")
    print(f"| runq over 1,000 queued 4-KiB messages into a maildir | {rate:.0f} msg/s |")
    print(f"| CPU per message in that runq | {cpu_ms:.2f} ms |")
    print(f"| 200 `sendmail` calls in a row | {call_rate:.0f} calls/s |")
    print(f"| 200 calls, then runq delivers them all | {total_rate:.0f} msg/s overall |")


if __name__ == "__main__":
    main()
