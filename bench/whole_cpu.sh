#!/usr/bin/env bash
# Whole-machine CPU per message for each row of ../shared/tools/peers/side_by_side.sh,
# Postfix and masq in one run, set up exactly as that tool sets them up: it runs the
# same peer scripts and keeps their last lines whole (side_by_side.sh keeps only the
# rate).  From each: system_cpu_ms_per_msg (the whole machine's busy time per message,
# from /proc/stat, the load generator included, the driver's own CPU not) and, where the
# script gives it, sendmail_cpu_ms (the sendmail processes) or client_cpu_ms_per_msg
# (smtp-source itself).  Needs root, like side_by_side.sh (it installs Postfix and
# purges it at the end, since Postfix takes /usr/sbin/sendmail over).
# Usage (from the project's root, after `make install`): bench/whole_cpu.sh [VENV [ROUNDS]]
set -u
peers="$(cd "$(dirname "$0")/../../shared/tools/peers" && pwd)"
venv="$(cd "${1:-.venv}" && pwd)" || { echo "no venv ${1:-.venv}: run make install first"; exit 1; }
rounds="${2:-3}"
. "$peers/common.sh"
ensure_user
out="$(mktemp -d)"; srv=; snd=
trap 'kill $srv $snd 2>/dev/null; "$peers/postfix.sh" purge >/dev/null 2>&1; rm -rf "$out"' EXIT
export TOOLS_DIR="${TOOLS_DIR:-$HOME/.cache/masq-bench-tools}"
[ -x "$TOOLS_DIR/bin/smtp-source" ] || "$peers/../get-postfix-tools.sh" >/dev/null 2>&1
src="$TOOLS_DIR/bin/smtp-source"
command -v postfix >/dev/null || "$peers/postfix.sh" install
home="$(user_home)"
measure() {  # $1 label, $2 sendmail, $3 maildir
  local l=$1 sm=$2 md=$3
  SENDMAIL="$sm" RCPT=$BENCH_USER@localhost MAILDIR="$md" N=200 REPEATS=$rounds LABEL=${l}_local \
    python3 "$peers/submit_local.py" 2>>"$out/log" | tail -1
  for s in 1 10; do
    SMTP_SOURCE="$src" SMTP_PORT=$SMTP_PORT SESSIONS=$s MESSAGES=$((s == 1 ? 300 : 500)) \
      REPEATS=$rounds RCPT=$BENCH_USER@localhost MAILDIR="$md" TIMEOUT=120 LABEL=${l}_smtp$s \
      python3 "$peers/smtp_source.py" 2>>"$out/log" | tail -1
  done
}

"$peers/postfix.sh" start >/dev/null 2>&1; sleep 2
measure postfix /usr/sbin/sendmail "$home/Maildir"
"$peers/postfix.sh" stop >/dev/null 2>&1; sleep 1

m="$out/m"; "$venv/bin/masq-setup" local-only "$m" >/dev/null
MASQ_CONF="$m/masq.toml" "$venv/bin/masq-send" >"$out/send.log" 2>&1 & snd=$!
MASQ_CONF="$m/masq.toml" "$venv/bin/masq-tcpserver" 127.0.0.1 "$SMTP_PORT" "$venv/bin/masq-smtpd" \
  >"$out/srv.log" 2>&1 & srv=$!
sleep 2
measure masq "$m/bin/sendmail" "$m/mail/$BENCH_USER"
