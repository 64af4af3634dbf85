#!/usr/bin/env bash
# Idempotent setup for the Python interop clients: a pinned venv in interop/.venv and the Debian
# packages the end-to-end tests use. Safe to re-run; non-interactive; expects root (or sudo-less apt).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"

log() { printf 'interop/setup.sh: %s\n' "$*"; }

# install_debian_packages PURPOSE PKG...: non-interactive, bounded apt-get update + install.
install_debian_packages() {
    local purpose="$1"
    shift
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing $* ($purpose) and no apt-get; install them by hand" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update to install: $*"
    timeout 600 apt-get update -qq
    timeout 1200 apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    log "installed Debian packages: $*"
}

# --- Debian packages -------------------------------------------------------------------------
need_pkgs=()
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
# The fleet balancer tests load nftables rulesets into network namespaces.
command -v nft >/dev/null 2>&1 || need_pkgs+=(nftables)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # Debian splits venv/ensurepip out of python3.
    need_pkgs+=(python3-venv)
fi
if ((${#need_pkgs[@]})); then
    install_debian_packages "for the tests" "${need_pkgs[@]}"
else
    log "Debian packages present (iproute2, nftables, curl, python3-venv)"
fi

# --- venv ------------------------------------------------------------------------------------
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating venv $venv"
    python3 -m venv "$venv"
else
    log "venv exists: $venv"
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
    log "installing pinned requirements from $req"
    timeout 900 "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
    log "installed: $("$venv/bin/python" -m pip freeze --disable-pip-version-check | grep -iE '^(aioquic|curl.cffi)=' | tr '\n' ' ')"
else
    log "requirements already installed (stamp matches)"
fi

# Fail loudly here rather than in a test if the wheels are unusable on this machine.
"$venv/bin/python" -c 'import aioquic, curl_cffi; from curl_cffi.const import CurlProxyType; assert CurlProxyType.HTTPS3 == 8' \
    || { log "import check failed" >&2; exit 1; }
log "ok: $venv/bin/python (aioquic + curl_cffi importable, CurlProxyType.HTTPS3 present)"

# --- interop/quiche: BoringSSL (via the `boring` crate) needs cmake and libclang ---------------
# Separate from the block above so it can be read (and dropped) on its own. Idempotent.
quiche_pkgs=()
command -v cmake >/dev/null 2>&1 || quiche_pkgs+=(cmake)
# libclang itself (bindgen loads libclang.so / libclang-N.so), not libclang-cpp, which other
# packages pull in and which bindgen cannot use.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
    /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1; then
    quiche_pkgs+=(libclang-dev)
fi
if ((${#quiche_pkgs[@]})); then
    install_debian_packages "for interop/quiche" "${quiche_pkgs[@]}"
else
    log "Debian packages for interop/quiche present (cmake, libclang)"
fi

# --- TCP front-end tests (crates/testkit/tests/tcp_front.rs) --------------------------------
# Owner: TCP fallback front-end. Debian curl (HTTP/1.1 CONNECT through an HTTPS proxy), headless
# Chromium (HTTPS proxy, h2) and certutil (NSS db Chromium trusts the dev CAs from).
tcp_front_pkgs=()
[[ -x /usr/bin/curl ]] || tcp_front_pkgs+=(curl)
[[ -x /usr/bin/chromium ]] || tcp_front_pkgs+=(chromium)
command -v certutil >/dev/null 2>&1 || tcp_front_pkgs+=(libnss3-tools)
if ((${#tcp_front_pkgs[@]})); then
    install_debian_packages "for tcp_front tests" "${tcp_front_pkgs[@]}"
else
    log "Debian packages for tcp_front tests present (curl, chromium, certutil)"
fi

# --- Firefox in the interop matrix (interop/firefox_masque.py) -------------------------------
# Debian firefox-esr (>= 153 has MASQUE proxies) and certutil (the dev CAs go into each run's own
# profile NSS db). interop/run reports the firefox cells as n/a, never pass, without them.
firefox_pkgs=()
[[ -x /usr/bin/firefox-esr ]] || firefox_pkgs+=(firefox-esr)
command -v certutil >/dev/null 2>&1 || firefox_pkgs+=(libnss3-tools)
if ((${#firefox_pkgs[@]})); then
    install_debian_packages "for interop/run's firefox cells" "${firefox_pkgs[@]}"
else
    log "Debian packages for the firefox interop cells present (firefox-esr, certutil)"
fi
ff_version="$(/usr/bin/firefox-esr --version 2>/dev/null | grep -oE '[0-9]+' | head -1 || true)"
if [[ -z "$ff_version" || "$ff_version" -lt 153 ]]; then
    log "firefox-esr ${ff_version:-?} is older than 153 (no MASQUE proxy support): the firefox cells will fail" >&2
fi
