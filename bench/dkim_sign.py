#!/usr/bin/env python3
"""The cost of a DKIM signature per message (masq.dkim with dkimpy).

Usage: bench/dkim_sign.py [--messages N] [--runs R] [--sizes BYTES,...]

Makes an RSA 2048 and an ed25519 key with `masq-setup dkim` in a temporary
folder, then times Signer.sign() -- what masq-send and masq-smtp call once
per message and route -- over N messages of each size, R runs, and prints
the median CPU time per message.  Also the one-time cost a signing program
pays: importing dkimpy (with dnspython and PyNaCl) in a fresh interpreter,
against `python3 -c pass`.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)


def message(size):
    head = (b"From: Alice <alice@example.org>\nTo: bob@remote.example\nSubject: bench\n"
            b"Date: Mon, 7 Dec 2026 10:00:00 +0000\nMessage-ID: <b@example.org>\n\n")
    line = b"x" * 63 + b"\n"
    return head + line * max(1, (size - len(head)) // 64)


def import_ms(code, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", code], check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="4096,1048576")
    args = parser.parse_args()
    from masq import config, dkim
    with tempfile.TemporaryDirectory() as folder:
        signers = {}
        for algorithm, selector in (("rsa", "r"), ("ed25519", "e")):
            subprocess.run([os.path.join(BIN, "masq-setup"), "dkim", folder, "example.org",
                            selector, "--algorithm", algorithm], check=True,
                           stdout=subprocess.DEVNULL)
            conf = config.Config(os.path.join(folder, "masq.toml"), {})
            signers[algorithm] = dkim.Signer(conf, {
                "dkim_key": f"keys/{selector}._domainkey.example.org.key",
                "dkim_selector": selector, "dkim_domain": "example.org"}, "bench")
        for size in (int(s) for s in args.sizes.split(",")):
            data = message(size)
            count = args.messages if size <= 65536 else max(5, args.messages // 20)
            for algorithm, signer in signers.items():
                signer.sign(data)           # the key read and dkimpy imported once
                per = []
                for _ in range(args.runs):
                    start = time.process_time()
                    for _ in range(count):
                        signer.sign(data)
                    per.append((time.process_time() - start) / count * 1000)
                print(f"{algorithm:8} {len(data):>8} bytes: {statistics.median(per):7.2f} ms "
                      f"CPU per message (range {min(per):.2f}-{max(per):.2f}, {count} x "
                      f"{args.runs})")
    bare = import_ms("pass", args.runs * 2)
    loaded = import_ms("import dkim, nacl.signing", args.runs * 2)
    print(f"import dkimpy + PyNaCl in a fresh interpreter: {loaded - bare:.1f} ms "
          f"(python -c pass: {bare:.1f} ms)")


if __name__ == "__main__":
    main()
