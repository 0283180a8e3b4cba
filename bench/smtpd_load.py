#!/usr/bin/env python3
"""Load masq-smtpd behind a listener and report messages per second.

Usage: bench/smtpd_load.py [--listener masq|ucspi] [--maxuse N] [--messages N] [--clients N]
                           [--pipelined N] [--size BYTES] [--smtp-source PATH] [--keep]

Makes a masq folder with masq-setup in a temporary folder, starts the
listener on 127.0.0.1 (port 0, read back with -1), then:
  1. one session that pipelines --pipelined messages (MAIL RCPT DATA each);
  2. --clients processes sending --messages in all, a new connection per
     message (EHLO, MAIL, RCPT, DATA, QUIT);
and checks that every message is in the queue exactly once, then that one
runq delivers every one of them once into the maildir.  With
--smtp-source (Postfix's load generator, from /work/shared/tools/
get-postfix-tools.sh) step 2 is `smtp-source -s CLIENTS -m N -l SIZE`
instead of Python clients, which leaves more CPU to the server; then only
the count of queued messages is checked.  It also samples
the resident memory of the masq-smtpd processes (VmRSS, VmHWM).  Every
message is fsynced before its 250 (masq-queue's commit): nothing is weakened.
"""
import argparse
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.path.dirname(os.path.abspath(sys.executable))


def message(tag, size):
    head = f"From: bench@client.example\r\nTo: bob@test.example\r\nSubject: {tag}\r\n\r\n"
    line = b"x" * 70 + b"\r\n"
    return head.encode() + line * max(1, size // len(line))


def start_listener(kind, conf, maxuse=1):
    smtpd = os.path.join(BIN, "masq-smtpd")
    if kind == "masq":
        argv = [os.path.join(BIN, "masq-tcpserver"), "-c", "100", "-m", str(maxuse), "-1",
                "127.0.0.1", "0", smtpd]
    else:
        argv = ["tcpserver", "-c", "100", "-1", "-H", "-R", "-l", "localhost",
                "127.0.0.1", "0", smtpd]
    env = dict(os.environ, MASQ_CONF=conf)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    port = int(proc.stdout.readline())
    return proc, port


def read_replies(sock, count, pattern=b"250 2.0.0 Ok: queued"):
    """Read until `count` lines starting with `pattern` have come."""
    buf, seen = b"", 0
    while seen < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit(f"connection closed after {seen} of {count} messages")
        buf += chunk
        lines = buf.split(b"\r\n")
        buf = lines.pop()
        for line in lines:
            if line.startswith(pattern):
                seen += 1
            elif line[:1] in (b"4", b"5"):
                raise SystemExit(f"refused: {line!r}")


def pipelined(port, count, size):
    """One session, every message pipelined; returns seconds taken."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.recv(1024)
    sock.sendall(b"EHLO bench\r\n")
    read_replies(sock, 1, b"250 CHUNKING")

    def send():
        for i in range(count):
            data = message(f"pipelined {i}", size).replace(b"\r\n.", b"\r\n..")
            sock.sendall(b"MAIL FROM:<bench@client.example>\r\nRCPT TO:<bob@test.example>\r\n"
                         b"DATA\r\n" + data + b".\r\n")
    start = time.monotonic()
    sender = threading.Thread(target=send)
    sender.start()
    read_replies(sock, count)
    elapsed = time.monotonic() - start
    sender.join()
    sock.sendall(b"QUIT\r\n")
    sock.close()
    return elapsed


def one_per_connection(args):
    """A client process: `count` messages, a new connection for each."""
    port, first, count, size = args
    for i in range(first, first + count):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.recv(1024)
            data = message(f"parallel {i}", size)
            sock.sendall(b"EHLO bench\r\n")
            read_replies(sock, 1, b"250 CHUNKING")
            sock.sendall(b"MAIL FROM:<bench@client.example>\r\nRCPT TO:<bob@test.example>\r\n"
                         b"DATA\r\n")
            read_replies(sock, 1, b"354 ")
            sock.sendall(data + b".\r\nQUIT\r\n")
            read_replies(sock, 1)
    return count


def parallel(port, clients, total, size):
    per = total // clients
    jobs = [(port, c * per, per, size) for c in range(clients)]
    start = time.monotonic()
    with multiprocessing.Pool(clients) as pool:
        done = sum(pool.map(one_per_connection, jobs))
    return done, time.monotonic() - start


def smtp_source(path, port, clients, total, size):
    start = time.monotonic()
    subprocess.run([path, "-s", str(clients), "-m", str(total), "-l", str(size),
                    "-f", "bench@client.example", "-t", "bob@test.example",
                    f"127.0.0.1:{port}"], check=True)
    return total, time.monotonic() - start


def sample_memory(listener_pid, stop, found):
    """Record the largest VmRSS and VmHWM of the listener's children."""
    while not stop.is_set():
        try:
            with open(f"/proc/{listener_pid}/task/{listener_pid}/children") as f:
                pids = f.read().split()
        except OSError:
            pids = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith(("VmRSS:", "VmHWM:")):
                            key, value = line.split()[:2]
                            found[key] = max(found.get(key, 0), int(value))
            except OSError:
                pass
        stop.wait(0.02)


def count_queue(folder):
    spool = os.path.join(folder, "spool")
    subjects = []
    for stage in ("incoming", "active"):
        for name in os.listdir(os.path.join(spool, stage)):
            with open(os.path.join(spool, stage, name), "rb") as f:
                data = f.read(4096)
            start = data.find(b"Subject: ") + 9
            subjects.append(data[start:data.index(b"\n", start)] if start > 8 else name.encode())
    return subjects


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listener", choices=("masq", "ucspi"), default="masq")
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--pipelined", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="where the masq folder goes (its disk counts)")
    ap.add_argument("--smtp-source", default=None, help="Postfix's smtp-source for step 2")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--maxuse", type=int, default=1,
                    help="masq-tcpserver -m: connections one masq-smtpd child may serve")
    args = ap.parse_args()
    top = tempfile.mkdtemp(prefix="masq-bench-", dir=args.dir)
    folder = os.path.join(top, "masq")
    subprocess.run([os.path.join(BIN, "masq-setup"), "local-only", folder,
                    "--hostname", "test.example"], check=True, stdout=subprocess.DEVNULL)
    conf = os.path.join(folder, "masq.toml")
    proc, port = start_listener(args.listener, conf, args.maxuse)
    memory, stop = {}, threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, stop, memory), daemon=True)
    sampler.start()
    try:
        seconds = pipelined(port, args.pipelined, args.size)
        print(f"{args.listener}: one pipelined session: {args.pipelined} messages in "
              f"{seconds:.2f} s = {args.pipelined / seconds:.0f} msg/s")
        if args.smtp_source:
            done, seconds = smtp_source(args.smtp_source, port, args.clients, args.messages,
                                        args.size)
        else:
            done, seconds = parallel(port, args.clients, args.messages, args.size)
        print(f"{args.listener}: {args.clients} clients, a connection per message: {done} "
              f"messages in {seconds:.2f} s = {done / seconds:.0f} msg/s")
    finally:
        stop.set()
        proc.terminate()
        proc.wait()
    subjects = count_queue(folder)
    want = args.pipelined + done
    dupes = len(subjects) - len(set(subjects))
    if args.smtp_source:        # its messages all have one subject: count the others
        dupes = len([s for s in subjects if s.startswith(b"pipelined")]) - len(
            {s for s in subjects if s.startswith(b"pipelined")})
    print(f"{args.listener}: queue holds {len(subjects)} messages (want {want}), "
          f"{dupes} duplicates")
    print(f"{args.listener}: masq-smtpd resident memory: VmRSS max {memory.get('VmRSS:', 0)} kB,"
          f" VmHWM max {memory.get('VmHWM:', 0)} kB")
    delivered = deliver(folder, conf)
    print(f"{args.listener}: one runq delivered {delivered} messages (want {want}); "
          f"queue left: {len(count_queue(folder))}")
    if not args.keep:
        shutil.rmtree(top)
    return 0 if len(subjects) == want and not dupes and delivered == want else 1


def deliver(folder, conf):
    """Run one queue run; count the messages that landed in the maildir."""
    subprocess.run([os.path.join(BIN, "masq-send"), "-C", conf, "--once"], check=True)
    new = os.path.join(folder, "mail", "bob", "new")
    return len(os.listdir(new)) if os.path.isdir(new) else 0


if __name__ == "__main__":
    sys.exit(main())
