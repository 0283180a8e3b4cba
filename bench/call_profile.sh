#!/bin/sh
# Where one sendmail call spends its CPU: perf samples over N calls, by library.
# Usage: bench/call_profile.sh SENDMAIL RCPT [N]    e.g. /usr/sbin/sendmail benchu@localhost
#        (a masq folder's bin/sendmail, Postfix's /usr/sbin/sendmail, or
#         "python" for a bare `python -I -S -c pass` of the venv's interpreter)
# Prints the share of the samples per library and the top symbols; the CPU
# per call itself comes from ../shared/tools/peers/lib/cmdtime.py.
set -eu
sm=$1 rcpt=$2 n=${3:-100}
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf 'From: a@bench.example\nTo: %s\nSubject: profile\n\n' "$rcpt" > "$out/msg"
i=0; while [ $i -lt 52 ]; do printf '%076d\n' $i >> "$out/msg"; i=$((i + 1)); done
if [ "$sm" = python ]; then
  cmd="$here/.venv/bin/python -I -S -c pass"
else
  cmd="$sm -i $rcpt"
fi
printf 'for i in $(seq %s); do %s < %s; done\n' "$n" "$cmd" "$out/msg" > "$out/loop.sh"
perf record -q -e cpu-clock -F 20000 -o "$out/perf.data" -- sh "$out/loop.sh" >/dev/null 2>&1
echo "## $cmd, $n calls: samples by library"
perf report -i "$out/perf.data" --sort dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
echo "## top symbols"
perf report -i "$out/perf.data" --sort sym --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -10
