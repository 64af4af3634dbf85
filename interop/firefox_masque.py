#!/usr/bin/env python3
"""Load one page in headless Firefox ESR through a MASQUE relay (HTTP/3 proxy) and report what the
page's DOM and Firefox's own resource timing say.

  HTTPS origin (TCP): Firefox opens a classic CONNECT over HTTP/3 to the relay.
  HTTP/3 origin:      --h3-origin-port forces h3 to the origin (the alt-svc-mapping test prefs);
                      Firefox then opens a CONNECT-UDP tunnel and carries QUIC inside it.

How Firefox is driven, and why this way (stdlib only, no files outside the run's own directory):
  * a fresh profile per run (Firefox remembers HTTP/3 failures per host), with user.js prefs that
    keep every byte on loopback (no telemetry, updates, Safe Browsing, captive-portal probe,
    Normandy, remote settings, DoH, prefetch) and the two traps from SPEC-NOTES handled:
    `network.http.http3.disable_when_third_party_roots_found = false` (else Firefox drops HTTP/3
    with a dev CA in the profile and silently falls back to the relay's TCP front-end) and
    `network.proxy.failover_direct = false` (a broken proxy cannot be masked by a direct fetch);
  * the relay's and the origin's dev CAs go into the profile's own NSS db with certutil;
  * Marionette (`-marionette -remote-allow-system-access`, port 0: Firefox writes the port it chose to
    PROFILE/MarionetteActivePort) registers the MASQUE proxy from the chrome context with
    nsIProtocolProxyService.newMASQUEProxyInfo in an nsIProtocolProxyChannelFilter. This needs no
    autoconfig file in Firefox's install directory (shared by every user of the machine) and no
    unsigned WebExtension; the same session then navigates, reads the DOM and quits Firefox.
Firefox runs in this script's own process group; every other member is killed at the end whatever
happened (and a timeout in interop/run kills the whole group).

Prints one JSON line {"ok": ..., "detail"|"error": ...}; exits 0 only if every expectation held.

  python3 interop/firefox_masque.py --relay 127.0.0.1:4433 --relay-ca certs/ca.pem --token T \\
      --origin-ca origin-ca.pem --url https://localhost:8443/page/n0nce.html --expect-marker n0nce \\
      --expect-protocol h2
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

FIREFOX = "/usr/bin/firefox-esr"
CERTUTIL = "/usr/bin/certutil"
INSTALL_HINT = "apt-get install -y firefox-esr libnss3-tools (interop/setup.sh)"
ORIGIN_TEXT = "cfr-testkit origin: hello"  # crates/testkit/src/origins.rs marker_page_html
UDP_TEMPLATE = "/.well-known/masque/udp/{target_host}/{target_port}/"  # RFC 9298 default

# Prefs that keep a headless Firefox on loopback and quiet. Marionette's recommended prefs
# (remote.prefs.recommended) cover much of this too; listing them here makes the run independent
# of that list.
QUIET_PREFS = {
    "app.update.auto": False,
    "app.update.enabled": False,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "app.normandy.api_url": "",
    "app.shield.optoutstudies.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.page": 0,
    "browser.startup.homepage": "about:blank",
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.newtabpage.enabled": False,
    "browser.newtabpage.activity-stream.feeds.system.topstories": False,
    "browser.newtabpage.activity-stream.feeds.snippets": False,
    "browser.newtabpage.activity-stream.telemetry": False,
    "browser.ping-centre.telemetry": False,
    "browser.discovery.enabled": False,
    "browser.search.update": False,
    "browser.region.network.url": "",
    "browser.region.update.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.downloads.remote.enabled": False,
    "browser.safebrowsing.provider.google.updateURL": "",
    "browser.safebrowsing.provider.google4.updateURL": "",
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "browser.sessionstore.resume_from_crash": False,
    "browser.ml.enable": False,
    "browser.aboutwelcome.enabled": False,
    "browser.backup.scheduled.enabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.archive.enabled": False,
    "toolkit.telemetry.server": "",
    "toolkit.startup.max_resumed_crashes": -1,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.systemAddon.update.enabled": False,
    "extensions.blocklist.enabled": False,
    "services.settings.server": "",
    "security.remote_settings.crlite_filters.enabled": False,
    "security.remote_settings.intermediates.enabled": False,
    "security.OCSP.enabled": 0,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.trr.mode": 5,  # DNS over HTTPS off by choice
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.predictor.enabled": False,
    "network.http.speculative-parallel-limit": 0,
    "media.gmp-manager.url": "",
    "media.gmp-gmpopenh264.enabled": False,
    "geo.provider.network.url": "",
    "captivedetect.canonicalURL": "",
}


def pref_line(name, value):
    return f"user_pref({json.dumps(name)}, {json.dumps(value)});\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relay", required=True, metavar="HOST:PORT", help="the relay's HTTP/3 address")
    p.add_argument("--relay-ca", required=True, metavar="FILE", help="CA PEM of the relay's certificate")
    p.add_argument("--token", required=True, help="bearer token (sent as Proxy-Authorization: Bearer ...)")
    p.add_argument("--origin-ca", required=True, metavar="FILE", help="CA PEM of the origin's certificate")
    p.add_argument("--url", required=True, help="page to load, https://localhost:PORT/page/MARKER.html")
    p.add_argument("--expect-marker", required=True, help="text of the page's <p id=marker>")
    p.add_argument("--expect-protocol", required=True, help="nextHopProtocol Firefox must report (h2, h3)")
    p.add_argument("--h3-origin-port", type=int, help="force HTTP/3 to localhost:PORT (alt-svc mapping prefs)")
    p.add_argument("--timeout", type=float, default=90, help="bound on the whole run, seconds")
    p.add_argument(
        "--page-load-timeout",
        type=float,
        default=30,
        help="bound on the page load, seconds (a refused tunnel or a 407 leaves Firefox waiting, not at an error page)",
    )
    p.add_argument(
        "--third-party-roots-trap",
        action="store_true",
        help="self-check: leave network.http.http3.disable_when_third_party_roots_found at its default "
        "(true), so Firefox gives up HTTP/3 and falls back to the relay's TCP front-end",
    )
    p.add_argument("--firefox", default=FIREFOX)
    return p.parse_args(argv)


class MarionetteError(Exception):
    pass


class Marionette:
    """The Marionette wire protocol: `LEN:JSON` frames; commands [0, id, name, params], replies
    [1, id, error, result]."""

    def __init__(self, port, deadline):
        self.deadline = deadline
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=self._left())
        self.buf = b""
        self.next_id = 0
        hello = self._read()
        if hello.get("applicationType") != "gecko":
            raise MarionetteError(f"unexpected Marionette greeting {hello}")

    def _left(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def _read(self):
        while True:
            if b":" in self.buf:
                n, rest = self.buf.split(b":", 1)
                n = int(n)
                if len(rest) >= n:
                    self.buf = rest[n:]
                    return json.loads(rest[:n])
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MarionetteError("Marionette connection closed")
            self.buf += chunk

    def call(self, name, params=None):
        self.next_id += 1
        body = json.dumps([0, self.next_id, name, params or {}]).encode()
        self.sock.settimeout(self._left())
        self.sock.sendall(str(len(body)).encode() + b":" + body)
        while True:
            msg = self._read()
            if isinstance(msg, list) and msg[0] == 1 and msg[1] == self.next_id:
                if msg[2]:
                    err = msg[2]
                    raise MarionetteError(f"{name}: {err.get('error')}: {err.get('message')}")
                return msg[3]

    def script(self, source, args=()):
        return self.call("WebDriver:ExecuteScript", {"script": source, "args": list(args)}).get("value")


# Runs in the chrome context: every request for the origin goes to the relay as an HTTP/3
# (MASQUE) proxy; Firefox picks CONNECT for a TCP origin and CONNECT-UDP for an HTTP/3 one.
REGISTER_PROXY = """
const [relayHost, relayPort, template, authorization, originHost, originPort] = arguments;
const pps = Cc["@mozilla.org/network/protocol-proxy-service;1"].getService(Ci.nsIProtocolProxyService);
const filter = {
  QueryInterface: ChromeUtils.generateQI(["nsIProtocolProxyChannelFilter"]),
  applyFilter(channel, defaultProxy, callback) {
    const uri = channel.URI;
    if (uri.asciiHost === originHost && uri.port === originPort) {
      callback.onProxyFilterResult(pps.newMASQUEProxyInfo(
        relayHost, relayPort, template, authorization, "cfr-interop",
        Ci.nsIProxyInfo.TRANSPARENT_PROXY_RESOLVES_HOST, 30, null));
      return;
    }
    callback.onProxyFilterResult(defaultProxy);
  },
};
pps.registerChannelFilter(filter, 0);
// Keep the filter reachable for the life of the window.
window.cfrInteropProxyFilter = filter;
return true;
"""

READ_PAGE = """
const nav = performance.getEntriesByType("navigation")[0];
const text = (id) => { const e = document.getElementById(id); return e ? e.textContent : null; };
return {href: location.href, origin: text("origin"), marker: text("marker"),
        nextHopProtocol: nav ? nav.nextHopProtocol : null};
"""


def make_profile(work, args):
    profile = os.path.join(work, "profile")
    os.makedirs(profile)
    prefs = dict(QUIET_PREFS)
    prefs.update(
        {
            "marionette.port": 0,  # any free port, written to PROFILE/MarionetteActivePort
            "network.http.http3.enable": True,
            "network.proxy.allow_hijacking_localhost": True,  # else localhost bypasses every proxy
            "network.proxy.failover_direct": False,
        }
    )
    if not args.third_party_roots_trap:
        prefs["network.http.http3.disable_when_third_party_roots_found"] = False
    if args.h3_origin_port:
        prefs["network.http.http3.alt-svc-mapping-for-testing"] = f"localhost;h3=:{args.h3_origin_port}"
        prefs["network.http.http3.force-use-alt-svc-mapping-for-testing"] = True
    with open(os.path.join(profile, "user.js"), "w") as f:
        f.writelines(pref_line(k, v) for k, v in prefs.items())
    db = f"sql:{profile}"
    steps = [[CERTUTIL, "-N", "-d", db, "--empty-password"]]
    for name, pem in (("cfr-relay-dev-ca", args.relay_ca), ("cfr-origin-dev-ca", args.origin_ca)):
        steps.append([CERTUTIL, "-A", "-d", db, "-n", name, "-t", "C,,", "-i", pem])
    for argv in steps:
        r = subprocess.run(argv, capture_output=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.decode(errors='replace').strip()}")
    return profile


def wait_port_file(path, proc, deadline):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"firefox exited with status {proc.returncode} before Marionette listened")
        try:
            with open(path) as f:
                text = f.read().strip()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        time.sleep(0.1)  # polling a file Firefox writes once; bounded by the deadline
    raise TimeoutError("Marionette did not start")


def lead_own_process_group():
    """Firefox and its content processes stay in this script's process group, which this script
    leads: interop/run's timeout kills the whole group (script and browser) at once, and the cleanup
    below kills every other member."""
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)


def kill_firefox(proc):
    """SIGKILL every other process of this process group (Firefox's parent and content processes),
    until none is left; then reap Firefox's parent."""
    me, group = os.getpid(), os.getpgrp()
    for _ in range(50):
        found = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                if os.getpgid(int(entry)) == group:
                    os.kill(int(entry), signal.SIGKILL)
                    found += 1
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if not found:
            return


def run(args, work):
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    for tool in (args.firefox, CERTUTIL):
        if not os.access(tool, os.X_OK):
            return {"ok": False, "error": f"{tool} missing: {INSTALL_HINT}"}
    relay_host, relay_port = args.relay.rsplit(":", 1)
    profile = make_profile(work, args)
    env = dict(os.environ, HOME=work, MOZ_HEADLESS="1", MOZ_CRASHREPORTER_DISABLE="1",
               MOZ_DISABLE_AUTO_SAFE_MODE="1", XDG_CACHE_HOME=os.path.join(work, "cache"))
    log_path = os.path.join(work, "firefox.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [args.firefox, "-headless", "-no-remote", "-marionette", "-remote-allow-system-access", "-profile", profile, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=work,
        )
    try:
        port = wait_port_file(os.path.join(profile, "MarionetteActivePort"), proc, deadline)
        m = Marionette(port, deadline)
        m.call("WebDriver:NewSession", {"capabilities": {"alwaysMatch": {"acceptInsecureCerts": False}}})
        started = time.monotonic() - t0
        left_ms = int((deadline - time.monotonic()) * 1000)
        page_load_ms = min(int(args.page_load_timeout * 1000), left_ms - 10000)
        m.call("WebDriver:SetTimeouts", {"pageLoad": max(1000, page_load_ms), "script": 30000})
        m.call("Marionette:SetContext", {"value": "chrome"})
        origin = args.url.split("/")[2]
        origin_host, origin_port = origin.rsplit(":", 1)
        if m.script(REGISTER_PROXY, [relay_host, int(relay_port), UDP_TEMPLATE, f"Bearer {args.token}",
                                     origin_host, int(origin_port)]) is not True:
            raise RuntimeError("registering the MASQUE proxy filter failed")
        m.call("Marionette:SetContext", {"value": "content"})
        t1 = time.monotonic()
        m.call("WebDriver:Navigate", {"url": args.url})
        page = m.script(READ_PAGE)
        loaded = time.monotonic() - t1
        # Firefox 153 quits without a CONNECTION_CLOSE on the proxy connection (neither quitting
        # nor "net:cancel-all-connections" sends one): the relay sees the tunnels end at its
        # connection idle timeout.
        try:
            m.call("Marionette:Quit", {"flags": ["eForceQuit"]})
            proc.wait(timeout=max(1, min(20, deadline - time.monotonic())))
        except (MarionetteError, OSError, TimeoutError, subprocess.TimeoutExpired):
            pass
    finally:
        kill_firefox(proc)
    problems = []
    if page.get("href") != args.url:
        problems.append(f"page is {page.get('href')!r}, not {args.url!r}")
    if page.get("origin") != ORIGIN_TEXT:
        problems.append(f"#origin is {page.get('origin')!r}")
    if page.get("marker") != args.expect_marker:
        problems.append(f"#marker is {page.get('marker')!r}, want {args.expect_marker!r}")
    if page.get("nextHopProtocol") != args.expect_protocol:
        problems.append(f"nextHopProtocol {page.get('nextHopProtocol')!r}, want {args.expect_protocol!r}")
    detail = {"marker": page.get("marker"), "nextHopProtocol": page.get("nextHopProtocol"),
              "startup_s": round(started, 1), "load_s": round(loaded, 1)}
    if problems:
        return {"ok": False, "error": "; ".join(problems), "page": page}
    return {"ok": True, "detail": detail}


def main(argv):
    args = parse_args(argv)
    lead_own_process_group()
    work = tempfile.mkdtemp(prefix="cfr-firefox-")
    try:
        result = run(args, work)
    except Exception as e:  # reported as the cell's failure, with Firefox's own log tail
        tail = ""
        try:
            with open(os.path.join(work, "firefox.log"), errors="replace") as f:
                tail = f.read()[-600:]
        except OSError:
            pass
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "firefox_log_tail": tail}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
