#!/usr/bin/env bash
# Makes the aiortc interop test's dependency present, idempotently: a Python virtual environment
# with aiortc and websockets from PyPI (pinned), kept outside the repository
# (ENCORE_AIORTC_VENV, default ~/.cache/encore/aiortc). Prints PYTHON=<its interpreter> on stdout.
set -euo pipefail

log() { printf '[aiortc-deps] %s\n' "$*" >&2; }

AIORTC=1.16.0
WEBSOCKETS=17.4
venv=${ENCORE_AIORTC_VENV:-$HOME/.cache/encore/aiortc}
python=$venv/bin/python

wanted() {
    "$python" - "$AIORTC" "$WEBSOCKETS" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("aiortc"), version("websockets")) == (sys.argv[1], sys.argv[2]) else 1)
PY
}

if [[ ! -x $python ]] || ! wanted; then
    log "installing aiortc $AIORTC and websockets $WEBSOCKETS into $venv"
    if ! python3 -m venv "$venv" >&2; then
        # Debian's own python3 keeps venv in a package of its own.
        log "python3 -m venv failed: installing Debian's python3-venv"
        as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo -n "$@"; fi; }
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >&2 \
            || { as_root apt-get update -q >&2 && as_root env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends python3-venv >&2; }
        rm -rf "$venv"
        python3 -m venv "$venv" >&2
    fi
    "$python" -m pip install -q --disable-pip-version-check "aiortc==$AIORTC" "websockets==$WEBSOCKETS" >&2
    wanted || { log "error: the install did not give aiortc $AIORTC and websockets $WEBSOCKETS"; exit 1; }
fi
log "ready: aiortc $AIORTC, websockets $WEBSOCKETS ($python)"
echo "PYTHON=$python"
