#!/usr/bin/env python3
"""Messages per second relayed by masq's SMTP client to a loopback sink.

Usage: bench/smtp_relay.py [--messages N] [--runs R] [--size BYTES]

Three ways, 4 KiB messages by default, to a tiny threaded SMTP sink in this
script (it answers 250 to everything, offers PIPELINING, counts messages):

  reused      one connection, Session.send() N times (what masq-send does)
  connect     in-process, connect + send + QUIT for each message
  program     the masq-smtp program run once per message (start-up included)

Prints the median of R runs of each, in messages per second.
"""
import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)


class Sink:
    """A minimal SMTP server: one thread per connection, 250 to everything.

    Counts the messages and the connections (bench/relay.py uses it too).
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.messages = self.connections = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"220 sink ESMTP\r\n")
        buf, in_data = b"", False
        with conn:
            while data := conn.recv(262144):
                buf += data
                out = []
                while True:
                    if in_data:
                        end = buf.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        buf, in_data = buf[end + 5:], False
                        with self.lock:
                            self.messages += 1
                        out.append(b"250 ok\r\n")
                        continue
                    i = buf.find(b"\r\n")
                    if i < 0:
                        break
                    verb, buf = buf[:4].upper(), buf[i + 2:]
                    if verb == b"EHLO":
                        out.append(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                   b"250 SIZE 100000000\r\n")
                    elif verb == b"DATA":
                        out.append(b"354 go on\r\n")
                        in_data, buf = True, b"\r\n" + buf
                    elif verb == b"QUIT":
                        conn.sendall(b"".join(out) + b"221 bye\r\n")
                        return
                    else:
                        out.append(b"250 ok\r\n")
                if out:
                    conn.sendall(b"".join(out))


def message(size):
    head = b"From: a@b.example\nTo: r@x.example\nSubject: bench\n\n"
    line = b"the quick brown fox jumps over the lazy dog, again and again.\n"
    body = (line * (size // len(line) + 1))[:size - len(head) - 1] + b"\n"
    return head + body


def reused(conf, data, n):
    from masq import nexthop
    session = nexthop.connect(conf, "sink")
    start = time.perf_counter()
    for _ in range(n):
        [(letter, text)] = session.send("a@b.example", ["r@x.example"], io.BytesIO(data))
        assert letter == "K", text
    elapsed = time.perf_counter() - start
    session.close()
    return n / elapsed


def per_connection(conf, data, n):
    from masq import nexthop
    start = time.perf_counter()
    for _ in range(n):
        session = nexthop.connect(conf, "sink")
        [(letter, text)] = session.send("a@b.example", ["r@x.example"], io.BytesIO(data))
        session.close()
        assert letter == "K", text
    return n / (time.perf_counter() - start)


def program(conf_file, data, n):
    argv = [os.path.join(BIN, "masq-smtp"), "-C", conf_file, "--route", "sink",
            "a@b.example", "r@x.example"]
    start = time.perf_counter()
    for _ in range(n):
        p = subprocess.run(argv, input=data, capture_output=True)
        assert p.returncode == 0 and p.stdout.startswith(b"K "), p
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
    from masq import config
    sink = Sink()
    data = message(args.size)
    with tempfile.TemporaryDirectory() as folder:
        conf_file = os.path.join(folder, "masq.toml")
        with open(conf_file, "w") as f:
            f.write(f'hostname = "bench.example"\n[route.sink]\n'
                    f'host = "127.0.0.1:{sink.port}"\ntls = "none"\n')
        conf = config.load(conf_file)
        ways = [("reused", lambda: reused(conf, data, args.messages)),
                ("connect", lambda: per_connection(conf, data, args.messages // 4)),
                ("program", lambda: program(conf_file, data, max(args.messages // 20, 10)))]
        print(f"{len(data)}-byte messages, median of {args.runs} runs:")
        for name, way in ways:
            rates = [way() for _ in range(args.runs)]
            print(f"  {name:8} {statistics.median(rates):8.0f} msg/s   "
                  f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")
    print(f"sink received {sink.messages} messages")


if __name__ == "__main__":
    main()
