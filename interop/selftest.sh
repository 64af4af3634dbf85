#!/usr/bin/env bash
# Self-test of the interop clients without the real relay: starts the testkit origins (cargo example)
# and interop/selftest_masque_server.py (a small aioquic MASQUE server), then runs masque_aioquic.py
# and curl_h3_proxy.py through it. Loopback only; every step bounded; cleans up its own processes.
# Usage: bash interop/selftest.sh   (after bash interop/setup.sh)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
py="$here/.venv/bin/python"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

[[ -x "$py" ]] || { echo "selftest: run interop/setup.sh first" >&2; exit 1; }

# ORIGINS_BIN: a prebuilt `origins` example (skips the cargo build).
origins="${ORIGINS_BIN:-$root/target/debug/examples/origins}"
if [[ -z "${ORIGINS_BIN:-}" ]]; then
    (cd "$root" && timeout 900 cargo build -q -p cfr-testkit --example origins)
fi
"$origins" --tcp-echo 127.0.0.1:0 --udp-echo 127.0.0.1:0 --https 127.0.0.1:0 \
    --h3 127.0.0.1:0 --recording 127.0.0.1:0 --max-secs 300 >"$work/origins.out" 2>"$work/origins.err" &
pids+=($!)
"$py" "$here/selftest_masque_server.py" --listen 127.0.0.1:0 --cert-dir "$work" --max-secs 300 \
    >"$work/relay.out" 2>"$work/relay.err" &
pids+=($!)

for _ in $(seq 100); do
    grep -q '"ready"' "$work/origins.out" 2>/dev/null && grep -q listen "$work/relay.out" 2>/dev/null && break
    sleep 0.1
done
grep -q '"ready"' "$work/origins.out" || { echo "selftest: origins did not start" >&2; cat "$work/origins.err" >&2; exit 1; }
grep -q listen "$work/relay.out" || { echo "selftest: selftest server did not start" >&2; cat "$work/relay.err" >&2; exit 1; }

field() { "$py" -c 'import json,sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if str(d.get(sys.argv[2])) == sys.argv[3]: print(d[sys.argv[4]]); break' "$@"; }
tcp=$(field "$work/origins.out" origin tcp-echo addr)
udp=$(field "$work/origins.out" origin udp-echo addr)
https=$(field "$work/origins.out" origin https addr)
h3=$(field "$work/origins.out" origin h3 addr)
rec=$(field "$work/origins.out" origin recording addr)
oca=$(field "$work/origins.out" ready True ca_pem)
relay=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["listen"])' "$work/relay.out")
pca="$work/cert.pem"

pass=0; fail=0
run() {
    if timeout 120 "$py" "$@" >>"$work/results.jsonl"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "selftest: FAILED: $*" >&2; fi
}
m=("$here/masque_aioquic.py" --relay "$relay" --ca "$pca" --token selftest)
c=("$here/curl_h3_proxy.py" --proxy "$relay" --proxy-ca "$pca" --token selftest --ca "$oca")
run "${m[@]}" udp-echo --target "$udp" --payload-sizes 0,10,1200 --count 3
run "${m[@]}" --no-h3-datagram udp-echo --target "$udp" --payload-sizes 0,10,1200 --count 2
run "${m[@]}" tcp-echo --target "$tcp" --bytes 1048576
run "$here/masque_aioquic.py" --relay "$relay" --ca "$pca" expect-status --authority "$tcp" --status 407
run "${m[@]}" expect-status --protocol bogus --path /x --authority localhost --status 501
run "${c[@]}" --mode tcp --url "https://$https/bytes/1048576" --expect-pattern 1048576
run "${c[@]}" --mode udp --url "https://$h3/bytes/300000" --expect-pattern 300000
run "${c[@]}" --mode tcp --ech grease --url "https://$rec/" --expect-failure
run "${c[@]}" --no-proxy --mode udp --url "https://$h3/" --expect-body 'cfr-testkit origin: hello\n'

# The origins print what they saw on SIGTERM: the recording server must have received curl's
# ClientHello with the GREASE ECH extension (0xfe0d = 65037) unchanged through the tunnel.
kill -TERM "${pids[0]}"
for _ in $(seq 50); do grep -q '"exit"' "$work/origins.out" && break; sleep 0.1; done
if "$py" -c 'import json,sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d.get("summary") == "recording":
        sys.exit(0 if any(65037 in (c["client_hello_extensions"] or []) for c in d["connections"]) else 1)
sys.exit(1)' "$work/origins.out"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "selftest: FAILED: ECH extension not recorded" >&2; fi

cat "$work/results.jsonl"
echo "selftest: $pass passed, $fail failed"
[[ $fail -eq 0 ]]
