#!/usr/bin/env bash
# Plain curl calls as in Constant Contact's API docs, with only the host changed: point them at
# the proxy by swapping https://api.constantcontact.com / https://api.cc.email for its base URL.
# The credentials are deliberately stale: the proxy replaces them with its own.
#
# Usage: examples/curl/calls.sh [BASE_URL]   (default http://127.0.0.1:8080)
# Prints one line per call: METHOD PATH STATUS [retry-after=N] [error_key=KEY]
set -euo pipefail

base=${1:-${CTCT_PROXY_URL:-http://127.0.0.1:8080}}
base=${base%/}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# call LABEL_METHOD LABEL_PATH CURL_ARGS...: run curl, print the status line.
call() {
  local method=$1 path=$2
  shift 2
  local status retry key
  status=$(curl -sS --max-time 60 -o "$work/body" -D "$work/headers" -w '%{http_code}' "$@")
  retry=$(tr -d '\r' <"$work/headers" | sed -n 's/^[Rr]etry-[Aa]fter: *//p' | tail -n 1)
  key=$(grep -o '"error_key" *: *"[^"]*"' "$work/body" | head -n 1 | sed 's/.*"\([^"]*\)"$/\1/' || true)
  echo "$method $path $status${retry:+ retry-after=$retry}${key:+ error_key=$key}"
}

# v2: api_key in the query and a Bearer token, both stale.
call GET /v2/lists "$base/v2/lists?api_key=stale-key" \
  -H 'Authorization: Bearer stale-token' -H 'Accept: application/json'

# v3: Bearer only, JSON body.
call POST /v3/contacts "$base/v3/contacts" -X POST \
  -H 'Authorization: Bearer stale-token' -H 'Content-Type: application/json' \
  --data-binary '{"email_address":{"address":"curl@example.com","permission_to_send":"implicit"},"create_source":"Account"}'

# v2 bulk import, the multipart form the forum thread recommends for volume.
{
  echo 'EMAIL,FIRST NAME,LAST NAME'
  for n in $(seq 1 200); do echo "curl-$n@example.com,Curl$n,Example"; done
} >"$work/contacts.csv"
call POST /v2/activities/addcontacts "$base/v2/activities/addcontacts?api_key=stale-key" \
  -H 'Authorization: Bearer stale-token' -H 'Accept: application/json' \
  -F file_name=contacts.csv -F lists=1 -F "data=@$work/contacts.csv;type=text/csv"
