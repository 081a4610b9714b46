#!/usr/bin/env bash
# End to end against the real Firebase Auth Emulator (npm firebase-tools; it needs no Java).
#
#   scripts/emulator-e2e.sh
#
# 1. installs firebase-tools once into a cache dir (--omit=optional: without it a native module
#    compiles for ~14 minutes), 2. starts the Auth Emulator on 127.0.0.1:9099 for project
#    demo-encore, 3. signs a user up, sets the custom claim role=speaker through the emulator's admin
#    REST, signs in again to get a token carrying the claim, 4. verifies that token with encore's
#    verifier in firebase-emulator mode, 5. starts a server in firebase-emulator mode, joins a room
#    with that token as a speaker and publishes (both in tests/auth/emulator.rs).
#
# Environment: ENCORE_CACHE_DIR (default ~/.cache/encore), ENCORE_EMULATOR_PROJECT (demo-encore),
# ENCORE_EMULATOR_PORT (9099). Tokens are passed in environment variables, never printed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${ENCORE_CACHE_DIR:-$HOME/.cache/encore}
tools=$cache/firebase-tools
project=${ENCORE_EMULATOR_PROJECT:-demo-encore}
port=${ENCORE_EMULATOR_PORT:-9099}
base=http://127.0.0.1:$port
firebase=$tools/node_modules/.bin/firebase

log() { printf '[emulator-e2e] %s\n' "$*" >&2; }

# -- 1. firebase-tools -----------------------------------------------------------------------------
if [[ ! -x $firebase ]]; then
    log "installing firebase-tools into $tools (1-2 minutes)"
    mkdir -p "$tools"
    npm install --prefix "$tools" --no-audit --no-fund --omit=optional firebase-tools >&2
fi
log "firebase-tools $("$firebase" --version)"

# -- 2. the Auth Emulator --------------------------------------------------------------------------
work=$(mktemp -d)
emulator_pid=
cleanup() {
    if [[ -n $emulator_pid ]] && kill -0 "$emulator_pid" 2>/dev/null; then
        # SIGINT lets the CLI stop its emulator; kill only the process this script started.
        kill -INT "$emulator_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$emulator_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$emulator_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if curl -s -o /dev/null "$base/"; then
    log "something already listens on $base; stop it or set ENCORE_EMULATOR_PORT"
    exit 1
fi
cat >"$work/firebase.json" <<JSON
{"emulators": {"auth": {"host": "127.0.0.1", "port": $port}, "ui": {"enabled": false}}}
JSON
log "starting the Auth Emulator on $base for project $project"
(cd "$work" && NO_UPDATE_NOTIFIER=1 exec "$firebase" emulators:start --only auth --project "$project") \
    >"$work/emulator.log" 2>&1 &
emulator_pid=$!

for i in $(seq 1 180); do
    if curl -s -o /dev/null "$base/"; then break; fi
    if ! kill -0 "$emulator_pid" 2>/dev/null; then
        log "the emulator exited:"; cat "$work/emulator.log" >&2; exit 1
    fi
    if [[ $i == 180 ]]; then
        log "the emulator did not come up in 180 s:"; cat "$work/emulator.log" >&2; exit 1
    fi
    sleep 1
done
log "emulator ready"

# -- 3. a speaker ----------------------------------------------------------------------------------
# JSON in and out with node (firebase-tools needs it anyway; jq may be absent).
json_field() { node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const v=JSON.parse(s)[process.argv[1]];if(v===undefined){console.error("no field "+process.argv[1]+" in "+s.slice(0,300));process.exit(1)}process.stdout.write(String(v))})' "$1"; }
post() { curl -sS --fail-with-body -X POST -H 'content-type: application/json' "$@"; }

email="speaker-$$-$RANDOM@example.com"
password="encore-e2e-password"
identity=$base/identitytoolkit.googleapis.com/v1

uid=$(post "$identity/accounts:signUp?key=any" \
    -d "{\"email\":\"$email\",\"password\":\"$password\",\"returnSecureToken\":true}" | json_field localId)
log "signed up $email as uid $uid"

post "$identity/projects/$project/accounts:update" -H 'authorization: Bearer owner' \
    -d "{\"localId\":\"$uid\",\"customAttributes\":\"{\\\"role\\\":\\\"speaker\\\"}\"}" >/dev/null
log "set custom claim role=speaker"

# Sign in again: only a new token carries the claim.
ENCORE_EMULATOR_ID_TOKEN=$(post "$identity/accounts:signInWithPassword?key=any" \
    -d "{\"email\":\"$email\",\"password\":\"$password\",\"returnSecureToken\":true}" | json_field idToken)
export ENCORE_EMULATOR_ID_TOKEN ENCORE_EMULATOR_UID=$uid ENCORE_EMULATOR_PROJECT=$project
log "got an ID token with the claim"

# -- 4 and 5. verify it with encore's verifier, then join and publish on a real server ------------
log "verifying with encore (firebase-emulator mode), then joining a room as a speaker"
(cd "$root" && cargo test --test tests auth::emulator:: -- --ignored) >&2
log "OK: the emulator's token verifies as uid $uid with role speaker, joins a room and publishes"
