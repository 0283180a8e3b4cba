#!/usr/bin/env python3
"""Measure one `sendmail` call: wall time and CPU, against a bare interpreter.

Usage: .venv/bin/python bench/sendmail_start.py [--runs N]

In a fresh folder made by masq-setup (on the same disk as the spool would be:
every call fsyncs), runs DIR/bin/sendmail -odq (queue only, no delivery)
N times (default 200, after 10 warm-up calls) with a 4-KiB message on
stdin, with the environment a user has (no MASQ_CONF: the link finds its
folder), and prints the median and 90th percentile of the wall time and the
median CPU (user + system, from wait4) per call as a Markdown table, beside
`python -I -S -c pass`, `python -c pass`, `sendmail -t` and the default
`sendmail` call (-odb, which finds no daemon and forks a background run).
Bytecode is compiled first, as an installation does.
"""
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lib")
BODY = (b"x" * 76 + b"\n") * 52          # 4 KiB of body


def spawn(argv, env, stdin_path):
    """Run argv with stdin from a file; return (wall seconds, CPU seconds)."""
    actions = [(os.POSIX_SPAWN_OPEN, 0, stdin_path, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(argv)} failed with status {status}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(argv, env, stdin_path, runs, warmup=10):
    for _ in range(warmup):
        spawn(argv, env, stdin_path)
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = spawn(argv, env, stdin_path)
        walls.append(wall * 1000)
        cpus.append(cpu * 1000)
    walls.sort()
    return statistics.median(walls), walls[int(len(walls) * 0.9)], statistics.median(cpus)


def wait_for_empty_queue(spool, seconds=120):
    """Let the background runs -odb started finish before the folder goes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(os.listdir(os.path.join(spool, s)) for s in ("incoming", "active")):
            return
        time.sleep(0.1)


def main():
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 200
    compileall.compile_dir(LIB, quiet=1)
    python = os.path.join(BIN, "python")
    with tempfile.TemporaryDirectory(dir=os.path.expanduser("~"),
                                     ignore_cleanup_errors=True) as d:
        folder = os.path.join(d, "m")
        subprocess.run([os.path.join(BIN, "masq-setup"), "local-only", folder,
                        "--hostname", "bench.example"], check=True, capture_output=True)
        plain = os.path.join(d, "plain")
        with open(plain, "wb") as f:
            f.write(b"Subject: one\n\n" + BODY)
        headed = os.path.join(d, "headed")
        with open(headed, "wb") as f:
            f.write(b'To: Bob <bob@localhost>, "Doe, Jane" <jane@localhost>\n'
                    b"Cc: carol@localhost (Carol)\nSubject: one\n\n" + BODY)
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
        sendmail = os.path.join(folder, "bin", "sendmail")
        cases = [
            ("`python -I -S -c pass`", [python, "-I", "-S", "-c", "pass"], plain),
            ("`python -c pass`", [python, "-c", "pass"], plain),
            ("`sendmail -odq bob` (4 KiB)", [sendmail, "-odq", "bob"], plain),
            ("`sendmail -odq -t` (3 recipients)", [sendmail, "-odq", "-t"], headed),
        ]
        rows = [(name, *measure(argv, env, stdin, runs)) for name, argv, stdin in cases]
        rows.append(("`sendmail bob` (-odb, forks a run)",
                     *measure([sendmail, "bob"], env, plain, max(runs // 4, 10))))
        wait_for_empty_queue(os.path.join(folder, "spool"))
    print(f"one call, {runs} runs, {os.cpu_count()} CPUs; ms\n")
    print("| command | wall median | wall p90 | CPU median |")
    print("| --- | ---: | ---: | ---: |")
    for name, median, p90, cpu in rows:
        print(f"| {name} | {median:.1f} | {p90:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
