#!/usr/bin/env bash
# End to end against the real Firebase Auth Emulator (npm firebase-tools; it needs no Java).
#
#   scripts/emulator-e2e.sh
#
# 1. installs firebase-tools once into a cache dir (--omit=optional: without it a native module
#    compiles for ~14 minutes), 2. starts the Auth Emulator on 127.0.0.1:9099 for project
#    demo-encore, 3. signs a user up and in (a token without a role claim), gives it another custom
#    claim through the emulator's admin REST, then sets role=speaker with `encore admin set-role`
#    (firebase-emulator mode, the same Identity Toolkit calls as in production), reads it back with
#    `get-role` and `list-roles`, signs in again and checks that the new token carries the role and
#    kept the other claim, 4. verifies both tokens with encore's verifier in firebase-emulator mode,
#    5. starts a server in firebase-emulator mode where the first token may not publish and the
#    second joins a room as a speaker and publishes (4 and 5 in tests/auth/emulator.rs).
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

# -- 3. a user, promoted by `encore admin` ---------------------------------------------------------
# JSON in and out with node (firebase-tools needs it anyway; jq may be absent).
json_field() { node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const v=JSON.parse(s)[process.argv[1]];if(v===undefined){console.error("no field "+process.argv[1]+" in "+s.slice(0,300));process.exit(1)}process.stdout.write(String(v))})' "$1"; }
# Checks the JSON on stdin with a JavaScript expression over `v`.
json_check() { node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const v=JSON.parse(s);if(!eval(process.argv[1])){console.error("expected "+process.argv[1]+", got "+s.slice(0,300));process.exit(1)}})' "$1"; }
post() { curl -sS --fail-with-body -X POST -H 'content-type: application/json' "$@"; }
sign_in() {
    post "$identity/accounts:signInWithPassword?key=any" \
        -d "{\"email\":\"$email\",\"password\":\"$password\",\"returnSecureToken\":true}" | json_field idToken
}

email="speaker-$$-$RANDOM@example.com"
password="encore-e2e-password"
identity=$base/identitytoolkit.googleapis.com/v1

uid=$(post "$identity/accounts:signUp?key=any" \
    -d "{\"email\":\"$email\",\"password\":\"$password\",\"returnSecureToken\":true}" | json_field localId)
log "signed up $email as uid $uid"
export ENCORE_EMULATOR_UID=$uid ENCORE_EMULATOR_PROJECT=$project
# A token from before any role claim: the default role.
ENCORE_EMULATOR_LISTENER_TOKEN=$(sign_in)

# A claim some other tool set, which setting the role must keep.
post "$identity/projects/$project/accounts:update" -H 'authorization: Bearer owner' \
    -d "{\"localId\":\"$uid\",\"customAttributes\":\"{\\\"tier\\\":\\\"gold\\\"}\"}" >/dev/null

# encore admin, configured as a server in firebase-emulator mode would be.
cat >"$work/encore.toml" <<TOML
[auth]
mode = "firebase-emulator"
project_id = "$project"
emulator_host = "127.0.0.1:$port"
TOML
encore_admin() { (cd "$root" && cargo run --quiet --bin encore -- admin "$@" --config "$work/encore.toml"); }
log "encore admin set-role --uid $uid --role speaker"
encore_admin set-role --uid "$uid" --role speaker >&2
encore_admin get-role --uid "$uid" --json | json_check 'v.uid === process.env.ENCORE_EMULATOR_UID && v.roles.join() === "speaker"'
encore_admin list-roles --json | json_check 'v.some(u => u.uid === process.env.ENCORE_EMULATOR_UID && u.roles.join() === "speaker")'
log "get-role and list-roles read it back"

# Sign in again: only a new token carries the claim.
ENCORE_EMULATOR_ID_TOKEN=$(sign_in)
export ENCORE_EMULATOR_ID_TOKEN ENCORE_EMULATOR_LISTENER_TOKEN
# The token's claims (read from the environment, never printed): the role, and the other claim kept.
node -e 'const c=JSON.parse(Buffer.from(process.env.ENCORE_EMULATOR_ID_TOKEN.split(".")[1],"base64url"));if(c.role!=="speaker"||c.tier!=="gold"){console.error("token claims: role="+c.role+" tier="+c.tier);process.exit(1)}'
log "got an ID token with role=speaker and tier=gold"

# -- 4 and 5. verify it with encore's verifier, then join and publish on a real server ------------
log "verifying with encore (firebase-emulator mode), then joining a room before and after"
(cd "$root" && cargo test --test tests auth::emulator:: -- --ignored) >&2
log "OK: encore admin made uid $uid a speaker; its new token verifies with the role, joins a room and publishes"
