#!/bin/sh
# A service in plain shell uses the mesh through its sidecar, with curl alone.
#
# Any language that speaks HTTP can be on the mesh: this script starts a
# `zeromesh agent` beside itself (HTTP API on 127.0.0.1, any free port, read
# from the agent's `ready` line), then, with nothing but curl and sh:
#   - subscribes to orders.> as Server-Sent Events (curl -N), in the background;
#   - publishes three orders (POST /v1/publish/orders.created, 202 each), one
#     with a W3C traceparent, which arrives with the event untouched;
#   - reads the three events back from the stream (parsed with sed, no jq);
#   - calls the echo service of another node (`zeromesh serve demo.echo --echo`,
#     started here) with POST /v1/request/demo.echo, and a service nobody
#     serves, which answers 503.
# It stops what it started, and only that, on any exit (trap).
#
# Run: sh examples/curl_service.sh     (needs `zeromesh` and curl on PATH)
set -eu

MESH="curl-demo-$$"
WORK=$(mktemp -d)
AGENT_PID="" SERVE_PID="" SSE_PID=""

cleanup() {
    for pid in $SSE_PID $SERVE_PID $AGENT_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $SSE_PID $SERVE_PID $AGENT_PID; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() { echo "curl_service: $*" >&2; exit 1; }

# wait_for FILE PATTERN WHAT [COUNT]: until FILE has COUNT lines matching PATTERN (10 s at most)
wait_for() {
    tries=0
    while n=$(grep -c -- "$2" "$1" 2>/dev/null); [ "${n:-0}" -lt "${4:-1}" ]; do  # no file yet: 0
        tries=$((tries + 1))
        [ "$tries" -le 100 ] || die "no $3 within 10 s"
        sleep 0.1
    done
}

# field NAME LINE: the value of NAME=... in a `ready` line
field() { printf '%s\n' "$2" | sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }

# json_field NAME JSON: a string field of a flat JSON object (enough for these events)
json_field() { printf '%s\n' "$2" | sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p"; }

command -v zeromesh >/dev/null || die "no zeromesh on PATH (activate the venv it is installed in)"
command -v curl >/dev/null || die "no curl on PATH"

# -- the sidecar and a service to call ------------------------------------------------
export ZEROMESH_INTERFACES=127.0.0.1
zeromesh agent --mesh "$MESH" --name shell-app --interface 127.0.0.1 --no-mdns \
    --http 127.0.0.1:0 >"$WORK/agent.out" 2>"$WORK/agent.err" &
AGENT_PID=$!
wait_for "$WORK/agent.out" '^ready ' "agent ready line"
READY=$(grep '^ready ' "$WORK/agent.out")
API=$(field http "$READY")
CTL=$(field ctl "$READY" | cut -d, -f1)
echo "agent up: $API (mesh $MESH)"

zeromesh serve demo.echo --echo --mesh "$MESH" --name echo-svc --interface 127.0.0.1 \
    --no-mdns --peer "$CTL" >"$WORK/serve.out" 2>"$WORK/serve.err" &
SERVE_PID=$!
wait_for "$WORK/serve.out" '^ready ' "echo service ready line"

# -- subscribe (SSE) ------------------------------------------------------------------
curl -sN "$API/v1/subscribe/orders.%3E" >"$WORK/events" &
SSE_PID=$!
wait_for "$WORK/events" '^: subscribed' "': subscribed' on the stream"
echo "subscribed to orders.>"

# -- publish --------------------------------------------------------------------------
TRACE="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
for order in "1 tea" "2 coffee" "3 cake"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: text/plain' \
        -H "traceparent: $TRACE" --data-binary "order $order" "$API/v1/publish/orders.created")
    [ "$code" = 202 ] || die "publish answered $code"
    echo "published: order $order ($code)"
done

wait_for "$WORK/events" '^id: ' "three events on the stream" 3
grep '^data: ' "$WORK/events" | while IFS= read -r line; do
    echo "event: $(json_field topic "$line") = $(json_field data "$line")" \
        "(traceparent $(json_field traceparent "$line"))"
done

# -- request/reply --------------------------------------------------------------------
# The agent may not know the service yet right after it started: 503 means "no
# responders", so ask again, for 10 s at most.
tries=0
while :; do
    code=$(curl -s -o "$WORK/reply" -w '%{http_code}' -X POST --data-binary 'ping from sh' \
        "$API/v1/request/demo.echo?timeout=2")
    [ "$code" = 503 ] || break
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || die "demo.echo never had a responder"
    sleep 0.1
done
[ "$code" = 200 ] || die "request answered $code: $(cat "$WORK/reply")"
echo "reply from demo.echo ($code): $(cat "$WORK/reply")"

code=$(curl -s -o "$WORK/reply" -w '%{http_code}' -X POST --data-binary 'hello?' \
    "$API/v1/request/demo.nobody?timeout=1")
echo "request to demo.nobody ($code): $(json_field error "$(cat "$WORK/reply")")"
echo "done"
