#!/usr/bin/env bash
# Makes the real-browser test's dependencies present, idempotently, and prints where they are.
#
#   scripts/browser-deps.sh            # installs what is missing, then prints KEY=VALUE lines
#
# - Debian's chromium (the real binary /usr/lib/chromium/chromium; the /usr/bin wrapper prints a
#   shell warning), espeak-ng and sox (the speech WAV): apt-get, with `apt-get update` first when
#   the package lists are empty or the install fails on a stale list. Needs root (or sudo).
# - Debian's firefox-esr (the real binary /usr/lib/firefox-esr/firefox-esr), for the Firefox test.
# - playwright-core and puppeteer-core from npm, into one cache dir. Neither downloads a browser of its
#   own: the tests launch Debian's chromium and firefox-esr through `executablePath`. puppeteer-core
#   drives Firefox over WebDriver BiDi (playwright cannot drive a stock Firefox); it stays on the 24.x
#   line because 25 needs node 22 and Debian 12 has node 18 (the machines here have 20).
#
# Output on stdout (logs go to stderr), one per line, for the test to read:
#   CHROMIUM=/usr/lib/chromium/chromium
#   CHROMIUM_VERSION=Chromium 1xx...
#   NODE=/usr/bin/node
#   PLAYWRIGHT_CORE=<cache>/node_modules/playwright-core
#   FIREFOX=/usr/lib/firefox-esr/firefox-esr
#   FIREFOX_VERSION=Mozilla Firefox 140...
#   PUPPETEER_CORE=<cache>/node_modules/puppeteer-core
#   NODE_PATH=<cache>/node_modules
#   ESPEAK_NG=/usr/bin/espeak-ng
#   SOX=/usr/bin/sox
#
# Environment: ENCORE_CACHE_DIR (default ~/.cache/encore), ENCORE_CHROMIUM (another chromium
# binary to use instead of Debian's), ENCORE_FIREFOX (likewise for firefox-esr),
# ENCORE_PLAYWRIGHT_VERSION and ENCORE_PUPPETEER_VERSION (defaults below).
set -euo pipefail

cache=${ENCORE_CACHE_DIR:-$HOME/.cache/encore}
dir=$cache/browser
playwright_version=${ENCORE_PLAYWRIGHT_VERSION:-1.65.1}
puppeteer_version=${ENCORE_PUPPETEER_VERSION:-24.43.1}
chromium=${ENCORE_CHROMIUM:-/usr/lib/chromium/chromium}
firefox=${ENCORE_FIREFOX:-/usr/lib/firefox-esr/firefox-esr}

log() { printf '[browser-deps] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_updated=no
apt_update() {
    if [[ $apt_updated == no ]]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        apt_updated=yes
    fi
}

# apt_install PKG...: installs with --no-install-recommends; refreshes the lists once if they are
# empty or if the first attempt fails (a stale list names versions the mirror no longer has).
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt_update
    fi
    log "apt-get install $*"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; then
        [[ $apt_updated == yes ]] && die "apt-get install $* failed"
        apt_update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
            || die "apt-get install $* failed"
    fi
}

# -- apt packages ------------------------------------------------------------------------------------
missing=()
if [[ -z ${ENCORE_CHROMIUM:-} && ! -x $chromium ]]; then missing+=(chromium); fi
if [[ -z ${ENCORE_FIREFOX:-} && ! -x $firefox ]]; then missing+=(firefox-esr); fi
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v sox >/dev/null 2>&1 || missing+=(sox)
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
fi
[[ -x $chromium ]] || die "no chromium binary at $chromium"
[[ -x $firefox ]] || die "no firefox binary at $firefox"
command -v espeak-ng >/dev/null 2>&1 || die "espeak-ng missing after install"
command -v sox >/dev/null 2>&1 || die "sox missing after install"

# -- node + playwright-core --------------------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
((node_major >= 18)) || die "node $(node --version) is too old: playwright-core needs node 18 or newer"

# npm_package NAME VERSION: installs NAME@VERSION into $dir unless that version is there already.
npm_package() {
    local name=$1 version=$2 installed=
    if [[ -f $dir/node_modules/$name/package.json ]]; then
        installed=$(node -p "require('$dir/node_modules/$name/package.json').version" 2>/dev/null || true)
    fi
    [[ $installed == "$version" ]] && return 0
    log "installing $name@$version into $dir"
    mkdir -p "$dir"
    [[ -f $dir/package.json ]] || printf '{"name":"encore-browser-deps","private":true}\n' >"$dir/package.json"
    for attempt in 1 2 3; do
        if PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 PUPPETEER_SKIP_DOWNLOAD=1 npm install --prefix "$dir" --no-audit \
            --no-fund --save-exact "$name@$version" >&2; then
            return 0
        fi
        ((attempt < 3)) || die "npm install $name@$version failed"
        log "npm install failed; trying again in $((attempt * 5)) s"
        sleep $((attempt * 5))
    done
}
npm_package playwright-core "$playwright_version"
npm_package puppeteer-core "$puppeteer_version"

# Chromium's version doubles as a smoke test of the binary (it must start at all).
version=$("$chromium" --headless --no-sandbox --disable-gpu --version 2>/dev/null | head -n1 | sed 's/[[:space:]]*$//' || true)
[[ -n $version ]] || die "$chromium --version printed nothing: is the binary broken?"
firefox_version=$("$firefox" --version 2>/dev/null | head -n1 | sed 's/[[:space:]]*$//' || true)
[[ -n $firefox_version ]] || die "$firefox --version printed nothing: is the binary broken?"

echo "CHROMIUM=$chromium"
echo "CHROMIUM_VERSION=$version"
echo "NODE=$(command -v node)"
echo "PLAYWRIGHT_CORE=$dir/node_modules/playwright-core"
echo "FIREFOX=$firefox"
echo "FIREFOX_VERSION=$firefox_version"
echo "PUPPETEER_CORE=$dir/node_modules/puppeteer-core"
echo "NODE_PATH=$dir/node_modules"
echo "ESPEAK_NG=$(command -v espeak-ng)"
echo "SOX=$(command -v sox)"
log "ready: $version, $firefox_version, playwright-core $playwright_version, puppeteer-core $puppeteer_version"
