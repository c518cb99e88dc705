#!/usr/bin/env bash
# curl --retry through ctct-proxy: a 429 is retried after its Retry-After (curl >= 7.66).
#
# --retry retries 408, 429, 500, 502, 503 and 504 whatever the method (POST included: a 429
# from the proxy means nothing was sent), waiting Retry-After when the answer has one, else 1 s
# doubling. It waits a daily-quota Retry-After of hours too: cap it with --retry-max-time.
# curl follows no redirect without -L. With -o, the file holds the last answer only (not
# -o /dev/null: curl cannot truncate it for a retry).
#
# Usage: examples/recipes/curl_retry.sh BASE_URL [COUNT]   (prints one JSON line per call)
set -euo pipefail

base=${1%/}
count=${2:-10}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

call() {
  local i=$1 method=GET status retries
  local args=(--get --data-urlencode limit=1)
  if ((i % 2)); then
    method=POST
    args=(-H 'Content-Type: application/json'
      --data-binary "{\"email_address\":{\"address\":\"curl-$i@example.com\"},\"create_source\":\"Account\"}")
  fi
  # --no-progress-meter keeps curl's "Will retry in N seconds" notes, counted below.
  status=$(curl --no-progress-meter --retry 10 --retry-max-time 120 --max-time 60 \
    -H 'Authorization: Bearer dummy' -o "$work/$i.json" -w '%{http_code}' \
    "${args[@]}" "$base/v3/contacts" 2>"$work/$i.err")
  retries=$(grep -c 'Will retry' "$work/$i.err" || true)
  printf '{"client":"curl","i":%d,"method":"%s","status":%d,"attempts":%d}\n' \
    "$i" "$method" "$status" "$((retries + 1))"
}

for ((i = 0; i < count; i++)); do
  call "$i" &
done
wait
