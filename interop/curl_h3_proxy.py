#!/usr/bin/env python3
"""Fetch a URL through a MASQUE relay with libcurl's HTTP/3 proxy support (curl_cffi's libcurl).

  --mode tcp  HTTPS (TCP) origin: curl opens a classic CONNECT over HTTP/3 to the relay.
  --mode udp  HTTP/3 origin (CURLOPT_HTTP_VERSION = V3ONLY): curl opens a CONNECT-UDP tunnel and
              carries QUIC in DATAGRAM capsules (it negotiates no HTTP datagrams).

Prints one JSON line with the result; exits 0 only if every expectation held.

Examples:
  interop/.venv/bin/python interop/curl_h3_proxy.py --proxy 127.0.0.1:4433 --proxy-ca ca.pem \\
      --token secret --ca ca.pem --mode tcp --url https://localhost:8443/bytes/1048576 \\
      --expect-pattern 1048576
  interop/.venv/bin/python interop/curl_h3_proxy.py --no-proxy --ca ca.pem --mode udp \\
      --url https://localhost:8443/ --expect-body 'cfr-testkit origin: hello\\n'
"""

import argparse
import hashlib
import json
import sys
import time

from curl_cffi import Curl, CurlError
from curl_cffi.const import CurlHttpVersion, CurlInfo, CurlOpt, CurlProxyType

import pattern

PROXY_TYPES = {
    "h3": CurlProxyType.HTTPS3,  # MASQUE over HTTP/3 (QUIC)
    "h2": CurlProxyType.HTTPS2,  # CONNECT over HTTP/2 (TLS)
    "h1": CurlProxyType.HTTPS,  # CONNECT over HTTP/1.1 (TLS)
}
HTTP_VERSIONS = {
    "1.1": CurlHttpVersion.V1_1,
    "2": CurlHttpVersion.V2TLS,
    "3only": CurlHttpVersion.V3ONLY,
}
# CURLINFO_HTTP_VERSION answers with CURL_HTTP_VERSION_* values.
CURL_VERSION_NAMES = {1: "1.0", 2: "1.1", 3: "2", 30: "3"}
CURLHEADER_SEPARATE = 1  # proxy headers go to the proxy only


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxy", metavar="HOST:PORT", help="relay address (required unless --no-proxy)")
    p.add_argument("--proxy-ca", metavar="FILE", help="CA PEM trusted for the relay's certificate")
    p.add_argument("--token", help="bearer token sent as Proxy-Authorization (omit to test 407)")
    p.add_argument("--proxy-type", choices=sorted(PROXY_TYPES), default="h3")
    p.add_argument("--url", required=True, help="origin URL, e.g. https://localhost:PORT/")
    p.add_argument("--ca", metavar="FILE", required=True, help="CA PEM trusted for the origin")
    p.add_argument("--mode", choices=["tcp", "udp"], required=True)
    p.add_argument(
        "--http-version",
        choices=sorted(HTTP_VERSIONS),
        help="origin HTTP version (default: curl's choice for tcp, 3only for udp)",
    )
    p.add_argument("--ech", choices=["grease"], help="CURLOPT_ECH (GREASE ECH extension 0xfe0d)")
    p.add_argument("--resolve", action="append", default=[], metavar="HOST:PORT:ADDR")
    p.add_argument("--expect-status", type=int, default=200)
    p.add_argument("--expect-body", help="exact body (Python escapes like \\n are decoded)")
    p.add_argument("--expect-body-sha256", metavar="HEX")
    p.add_argument("--expect-pattern", type=int, metavar="N", help="body is N bytes of the /bytes/N pattern")
    p.add_argument(
        "--expect-failure",
        action="store_true",
        help="succeed only if the transfer fails (e.g. an ECH ClientHello to a recording server)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="whole-transfer timeout, seconds")
    p.add_argument("--no-proxy", action="store_true", help="debug: fetch the origin directly")
    p.add_argument("--verbose", action="store_true", help="libcurl verbose output on stderr")
    a = p.parse_args(argv)
    if not a.no_proxy and not a.proxy:
        p.error("--proxy is required unless --no-proxy")
    if a.expect_body is not None:
        a.expect_body = a.expect_body.encode().decode("unicode_escape").encode("latin-1")
    return a


def fetch(a):
    c = Curl()
    body = bytearray()
    try:
        c.setopt(CurlOpt.URL, a.url)
        c.setopt(CurlOpt.WRITEFUNCTION, lambda chunk: body.extend(chunk) or len(chunk))
        c.setopt(CurlOpt.CAINFO, a.ca)
        c.setopt(CurlOpt.TIMEOUT_MS, int(a.timeout * 1000))
        c.setopt(CurlOpt.CONNECTTIMEOUT_MS, int(min(a.timeout, 15) * 1000))
        version = a.http_version or ("3only" if a.mode == "udp" else None)
        if version:
            c.setopt(CurlOpt.HTTP_VERSION, HTTP_VERSIONS[version])
        if a.ech:
            c.setopt(CurlOpt.ECH, a.ech)
        if a.resolve:
            c.setopt(CurlOpt.RESOLVE, a.resolve)
        if a.no_proxy:
            c.setopt(CurlOpt.NOPROXY, "*")
        else:
            c.setopt(CurlOpt.PROXYTYPE, PROXY_TYPES[a.proxy_type])
            c.setopt(CurlOpt.PROXY, f"https://{a.proxy}")
            c.setopt(CurlOpt.PROXY_CAINFO, a.proxy_ca or a.ca)
            c.setopt(CurlOpt.HEADEROPT, CURLHEADER_SEPARATE)
            if a.token is not None:
                c.setopt(CurlOpt.PROXYHEADER, [f"Proxy-Authorization: Bearer {a.token}".encode()])
            if a.mode == "tcp":
                # An https:// URL through a proxy is always tunnelled; be explicit anyway.
                c.setopt(CurlOpt.HTTPPROXYTUNNEL, 1)
        if a.verbose:
            c.setopt(CurlOpt.VERBOSE, 1)
        started = time.monotonic()
        error = None
        try:
            c.perform()
        except CurlError as e:
            error = str(e)
        elapsed = time.monotonic() - started
        info = {
            "status": c.getinfo(CurlInfo.RESPONSE_CODE),
            "connect_code": c.getinfo(CurlInfo.HTTP_CONNECTCODE),
            "http_version": CURL_VERSION_NAMES.get(c.getinfo(CurlInfo.HTTP_VERSION), "none"),
        }
        return error, bytes(body), info, elapsed
    finally:
        c.close()


def main(argv=None):
    a = parse_args(argv if argv is not None else sys.argv[1:])
    error, body, info, elapsed = fetch(a)
    result = {
        "tool": "curl_h3_proxy",
        "mode": a.mode,
        "proxy": None if a.no_proxy else a.proxy,
        "proxy_type": None if a.no_proxy else a.proxy_type,
        "url": a.url,
        "ech": a.ech,
        "error": error,
        **info,
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "elapsed_s": round(elapsed, 3),
    }
    failures = []
    if a.expect_failure:
        if error is None:
            failures.append("expected the transfer to fail, it succeeded")
    else:
        if error is not None:
            failures.append(f"transfer failed: {error}")
        if info["status"] != a.expect_status:
            failures.append(f"expected status {a.expect_status}, got {info['status']}")
        if a.expect_body is not None and body != a.expect_body:
            failures.append(f"body differs: expected {a.expect_body[:80]!r}, got {body[:80]!r}")
        if a.expect_body_sha256 and result["body_sha256"] != a.expect_body_sha256.lower():
            failures.append(f"body sha256 {result['body_sha256']} != expected {a.expect_body_sha256}")
        if a.expect_pattern is not None:
            want = pattern.pattern_sha256(pattern.BYTES_ROUTE_SEED, a.expect_pattern)
            if len(body) != a.expect_pattern or result["body_sha256"] != want:
                failures.append(
                    f"body is not the {a.expect_pattern}-byte pattern (got {len(body)} bytes, sha256 {result['body_sha256']})"
                )
    result["ok"] = not failures
    result["failures"] = failures
    print(json.dumps(result), flush=True)
    for f in failures:
        print(f"curl_h3_proxy: FAIL: {f}", file=sys.stderr)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
