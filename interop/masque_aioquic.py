#!/usr/bin/env python3
"""aioquic MASQUE client for interop tests against the cfr relay.

Subcommands:
  udp-echo      CONNECT-UDP (RFC 9298) to a UDP echo target; sends HTTP Datagrams (RFC 9297) with
                context ID 0 and checks each echo byte for byte. With --pvd it first fetches the
                relay's PvD (GET /.well-known/pvd, draft-ietf-intarea-proxy-config) on the same
                connection and uses the connect-udp URI template listed there.
  tcp-echo      classic CONNECT (RFC 9114 §4.4) to a TCP echo target; sends N pattern bytes, half-closes,
                reads them back and checks SHA-256.
  expect-status sends one crafted request and checks the response status (and Proxy-Status on errors).

Prints one JSON line; exit 0 on success, 1 on a failed check, 2 on usage errors. Every wait is bounded.

  interop/.venv/bin/python interop/masque_aioquic.py --relay 127.0.0.1:4433 --ca ca.pem --token T \\
      udp-echo --target 127.0.0.1:9000 --payload-sizes 0,10,1200 --count 3
"""

import argparse
import asyncio
import datetime
import hashlib
import json
import re
import sys
import time
from urllib.parse import quote, urlsplit

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, BufferReadError, encode_uint_var
from aioquic.h3.connection import H3_ALPN, H3Connection, Setting
from aioquic.h3.events import DataReceived, DatagramReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset

import pattern

CAPSULE_DATAGRAM = 0x00  # RFC 9297 §3.5
TCP_ECHO_SEED = 3


class Failure(Exception):
    """A check that did not hold; the message says what was expected."""


class MasqueH3(H3Connection):
    """H3Connection that advertises SETTINGS_H3_DATAGRAM=1 (RFC 9297 §2.1.1) when asked to."""

    def __init__(self, quic, h3_datagram: bool):
        self._want_h3_datagram = h3_datagram
        super().__init__(quic)

    def _get_local_settings(self):
        settings = super()._get_local_settings()
        if self._want_h3_datagram:
            settings[Setting.H3_DATAGRAM] = 1
        return settings


class StreamState:
    def __init__(self):
        self.headers = asyncio.get_running_loop().create_future()
        self.data = asyncio.Queue()  # bytes chunks; None = FIN
        self.datagrams = asyncio.Queue()  # payloads after the quarter stream ID
        self.reset = None  # error code if the peer reset the stream


class MasqueProtocol(QuicConnectionProtocol):
    h3_datagram = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = MasqueH3(self._quic, self.h3_datagram)
        self.streams = {}
        self.terminated = None

    def open_stream(self):
        sid = self._quic.get_next_available_stream_id()
        self.streams[sid] = StreamState()
        return sid, self.streams[sid]

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            self.terminated = f"connection closed: error 0x{event.error_code:x} {event.reason_phrase!r}"
            for st in self.streams.values():
                if not st.headers.done():
                    st.headers.set_exception(Failure(self.terminated))
                st.data.put_nowait(None)
        if isinstance(event, StreamReset) and event.stream_id in self.streams:
            st = self.streams[event.stream_id]
            st.reset = event.error_code
            if not st.headers.done():
                st.headers.set_exception(Failure(f"stream reset by relay with error 0x{event.error_code:x}"))
            st.data.put_nowait(None)
        for ev in self.h3.handle_event(event):
            st = self.streams.get(ev.stream_id)
            if st is None:
                continue
            if isinstance(ev, HeadersReceived):
                if not st.headers.done():
                    st.headers.set_result(ev.headers)
                if ev.stream_ended:
                    st.data.put_nowait(None)
            elif isinstance(ev, DataReceived):
                if ev.data:
                    st.data.put_nowait(ev.data)
                if ev.stream_ended:
                    st.data.put_nowait(None)
            elif isinstance(ev, DatagramReceived):
                st.datagrams.put_nowait(ev.data)


def split_hostport(s):
    if s.startswith("["):
        host, _, port = s[1:].partition("]:")
    else:
        host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or [V6]:PORT, got {s!r}")
    return host, int(port)


def authority(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def decode_headers(headers):
    return [(k.decode(errors="replace"), v.decode(errors="replace")) for k, v in headers]


def header(headers, name):
    for k, v in headers:
        if k == name:
            return v
    return None


async def wait(aw, timeout, what):
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise Failure(f"timed out after {timeout}s waiting for {what}") from None


def base_request(a, method, extra):
    h = [(b":method", method.encode())]
    h += extra
    if a.token is not None:
        h.append((b"proxy-authorization", f"Bearer {a.token}".encode()))
    return h


async def send_request(proto, headers, timeout, end_stream=False):
    sid, st = proto.open_stream()
    proto.h3.send_headers(sid, headers, end_stream=end_stream)
    proto.transmit()
    resp = decode_headers(await wait(st.headers, timeout, "response headers"))
    return sid, st, resp


def require_2xx(resp, what):
    status = header(resp, ":status")
    if status is None or not status.startswith("2"):
        raise Failure(f"{what}: expected a 2xx response, got {status} (proxy-status: {header(resp, 'proxy-status')})")


class CapsuleReader:
    """Parses capsules (RFC 9297 §3.2) from the CONNECT-UDP stream; collects DATAGRAM payloads."""

    def __init__(self):
        self.buf = b""

    def feed(self, data):
        self.buf += data
        out = []
        while True:
            b = Buffer(data=self.buf)
            try:
                ctype = b.pull_uint_var()
                length = b.pull_uint_var()
                if b.capacity - b.tell() < length:
                    break
                value = b.pull_bytes(length)
            except BufferReadError:
                break
            self.buf = self.buf[b.tell() :]
            if ctype == CAPSULE_DATAGRAM:
                out.append(value)
            # Unknown capsule types are skipped (RFC 9297 §3.2).
        return out


async def fetch_pvd(a, proto):
    """GET /.well-known/pvd (no credentials) and check it as a client must (RFC 8801 §4,
    draft-ietf-intarea-proxy-config §2): media type, identifier = the proxy's host name, not
    expired, empty prefixes. Returns the parsed object."""
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", a.relay_authority.encode()),
        (b":path", b"/.well-known/pvd"),
        (b"accept", b"application/pvd+json"),
    ]
    sid, st, resp = await send_request(proto, headers, a.timeout, end_stream=True)
    if header(resp, ":status") != "200":
        raise Failure(f"GET /.well-known/pvd: expected 200, got {header(resp, ':status')}")
    if header(resp, "content-type") != "application/pvd+json":
        raise Failure(f"PvD content-type is {header(resp, 'content-type')!r}, not application/pvd+json")
    body = b""
    while True:
        chunk = await wait(st.data.get(), a.timeout, "PvD body")
        if chunk is None:
            break
        body += chunk
    pvd = json.loads(body)
    want = (a.server_name or a.relay[0]).rstrip(".").lower()
    if str(pvd.get("identifier", "")).rstrip(".").lower() != want:
        raise Failure(f"PvD identifier {pvd.get('identifier')!r} is not the relay's host name {want!r}")
    expires = datetime.datetime.fromisoformat(pvd["expires"].replace("Z", "+00:00"))
    if expires <= datetime.datetime.now(datetime.timezone.utc):
        raise Failure(f"PvD expired at {pvd['expires']}")
    if pvd.get("prefixes") != []:
        raise Failure(f"PvD prefixes must be an empty array, got {pvd.get('prefixes')!r}")
    return pvd


def expand_template(template, host, port):
    """RFC 6570 expansion of a connect-udp template: {target_host}/{target_port} (simple) and
    {?target_host,target_port} (form-style query); other expressions are refused."""
    values = {"target_host": quote(host, safe=""), "target_port": str(port)}

    def one(m):
        expr = m.group(1)
        if expr.startswith("?"):
            return "?" + "&".join(f"{v}={values[v]}" for v in expr[1:].split(","))
        if expr not in values:
            raise Failure(f"template expression {{{expr}}} is not supported")
        return values[expr]

    return re.sub(r"\{([^}]*)\}", one, template)


async def cmd_udp_echo(a, proto):
    host, port = a.target
    authority_used = a.relay_authority
    template = "/.well-known/masque/udp/{target_host}/{target_port}/"
    if a.pvd:
        pvd = await fetch_pvd(a, proto)
        udp = [p for p in pvd.get("proxies", []) if p.get("protocol") == "connect-udp" and not p.get("mandatory")]
        if not udp:
            raise Failure(f"PvD lists no usable connect-udp proxy: {pvd.get('proxies')!r}")
        url = urlsplit(udp[0]["proxy"].replace("{", "%7B").replace("}", "%7D"))
        if url.scheme != "https":
            raise Failure(f"connect-udp template is not https: {udp[0]['proxy']!r}")
        authority_used = url.netloc
        template = udp[0]["proxy"][len("https://") + len(url.netloc):]
    # IPv6 colons become %3A (RFC 9298 §3).
    path = expand_template(template, host, port)
    headers = base_request(
        a,
        "CONNECT",
        [
            (b":protocol", b"connect-udp"),
            (b":scheme", b"https"),
            (b":authority", authority_used.encode()),
            (b":path", path.encode()),
            (b"capsule-protocol", b"?1"),
        ],
    )
    sid, st, resp = await send_request(proto, headers, a.timeout)
    require_2xx(resp, "CONNECT-UDP")
    if header(resp, "capsule-protocol") != "?1":
        raise Failure(f"CONNECT-UDP response lacks 'capsule-protocol: ?1' (got {header(resp, 'capsule-protocol')!r})")

    capsules = CapsuleReader()
    inbox = asyncio.Queue()  # (payload, how)

    async def pump_datagrams():
        while True:
            d = await st.datagrams.get()
            b = Buffer(data=d)
            try:
                ctx = b.pull_uint_var()
            except BufferReadError:
                continue
            if ctx == 0:
                inbox.put_nowait((d[b.tell() :], "datagram"))

    async def pump_stream():
        while True:
            chunk = await st.data.get()
            if chunk is None:
                inbox.put_nowait((None, "fin"))
                return
            for value in capsules.feed(chunk):
                b = Buffer(data=value)
                try:
                    ctx = b.pull_uint_var()
                except BufferReadError:
                    continue
                if ctx == 0:
                    inbox.put_nowait((value[b.tell() :], "capsule"))

    pumps = [asyncio.ensure_future(pump_datagrams()), asyncio.ensure_future(pump_stream())]
    stats = {"sent": 0, "echoed": 0, "via_datagram": 0, "via_capsule": 0, "retries": 0}
    try:
        for size in a.payload_sizes:
            for i in range(a.count):
                payload = pattern.pattern_bytes(size + 1000 * i, 0, size)
                for attempt in range(a.retries + 1):
                    if a.send_as == "capsule":
                        value = encode_uint_var(0) + payload
                        capsule = encode_uint_var(CAPSULE_DATAGRAM) + encode_uint_var(len(value)) + value
                        proto.h3.send_data(sid, capsule, end_stream=False)
                    else:
                        proto.h3.send_datagram(sid, encode_uint_var(0) + payload)
                    proto.transmit()
                    stats["sent"] += 1
                    got = await echo_of(inbox, payload, a.datagram_timeout)
                    if got is not None:
                        stats["echoed"] += 1
                        stats["via_" + got] += 1
                        break
                    stats["retries"] += 1
                else:
                    raise Failure(
                        f"no byte-exact echo of a {size}-byte payload (#{i}) after {a.retries + 1} tries "
                        f"of {a.datagram_timeout}s each"
                    )
    finally:
        for p in pumps:
            p.cancel()
    proto.h3.send_data(sid, b"", end_stream=True)
    proto.transmit()
    return {"status": int(header(resp, ":status")), "template": template, "path": path, **stats}


async def echo_of(inbox, payload, timeout):
    """Waits for `payload` to come back; other (late, duplicate) echoes are discarded."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            data, how = await asyncio.wait_for(inbox.get(), left)
        except asyncio.TimeoutError:
            return None
        if how == "fin":
            raise Failure("relay closed the CONNECT-UDP stream while echoes were pending")
        if data == payload:
            return how


async def cmd_tcp_echo(a, proto):
    host, port = a.target
    headers = base_request(a, "CONNECT", [(b":authority", authority(host, port).encode())])
    sid, st, resp = await send_request(proto, headers, a.timeout)
    require_2xx(resp, "CONNECT")

    sent = hashlib.sha256()
    received = hashlib.sha256()
    received_len = 0
    chunk = 64 * 1024

    async def reader():
        nonlocal received_len
        while True:
            data = await st.data.get()
            if data is None:
                return
            received.update(data)
            received_len += len(data)

    async def writer():
        off = 0
        while off < a.bytes:
            n = min(chunk, a.bytes - off)
            data = pattern.pattern_bytes(TCP_ECHO_SEED, off, n)
            sent.update(data)
            proto.h3.send_data(sid, data, end_stream=False)
            proto.transmit()
            off += n
            # Let the event loop flush and read between chunks instead of buffering it all.
            await asyncio.sleep(0)
        proto.h3.send_data(sid, b"", end_stream=True)  # FIN = TCP half-close toward the target
        proto.transmit()

    await wait(asyncio.gather(reader(), writer()), a.timeout, f"{a.bytes} bytes echoed back and FIN")
    if st.reset is not None:
        raise Failure(f"relay reset the CONNECT stream with error 0x{st.reset:x}")
    result = {
        "status": int(header(resp, ":status")),
        "sent_len": a.bytes,
        "received_len": received_len,
        "sha256_sent": sent.hexdigest(),
        "sha256_received": received.hexdigest(),
    }
    if received_len != a.bytes or sent.digest() != received.digest():
        raise Failure(f"echo differs: sent {a.bytes} bytes, got {received_len} back (sha256 mismatch)", result)
    return result


async def cmd_expect_status(a, proto):
    extra = []
    if a.protocol is not None:
        extra.append((b":protocol", a.protocol.encode()))
    scheme = a.scheme if a.scheme is not None else ("https" if a.protocol or a.path else None)
    if scheme:
        extra.append((b":scheme", scheme.encode()))
    if a.authority is not None:
        extra.append((b":authority", a.authority.encode()))
    if a.path is not None:
        extra.append((b":path", a.path.encode()))
    if a.protocol == "connect-udp":
        extra.append((b"capsule-protocol", b"?1"))
    for h in a.header:
        k, _, v = h.partition(":")
        extra.append((k.strip().lower().encode(), v.strip().encode()))
    # A CONNECT keeps its stream open (it is a tunnel); any other method is a complete request.
    end = a.method != "CONNECT"
    sid, st, resp = await send_request(proto, base_request(a, a.method, extra), a.timeout, end_stream=end)
    status = int(header(resp, ":status"))
    ps = header(resp, "proxy-status")
    result = {"status": status, "proxy_status": ps}
    if status != a.status:
        raise Failure(f"expected status {a.status}, got {status} (proxy-status: {ps})", result)
    if status >= 400 and not a.no_proxy_status_check and ps is None:
        raise Failure(f"error response {status} lacks a Proxy-Status header (RFC 9209)", result)
    if a.proxy_status_error and (ps is None or f"error={a.proxy_status_error}" not in ps):
        raise Failure(f"expected Proxy-Status error={a.proxy_status_error}, got {ps!r}", result)
    if not end and status < 300:
        proto.h3.send_data(sid, b"", end_stream=True)
        proto.transmit()
    # After an error response the relay has ended the exchange (FIN + STOP_SENDING, RFC 9114
    # §4.1); there is nothing to half-close.
    return result


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relay", required=True, type=split_hostport, metavar="HOST:PORT")
    p.add_argument("--ca", required=True, metavar="FILE", help="CA PEM trusted for the relay's certificate")
    p.add_argument("--token", help="bearer token (sent as proxy-authorization); omit to test auth errors")
    p.add_argument("--server-name", help="TLS SNI / name to verify (default: the relay host)")
    p.add_argument("--timeout", type=float, default=10.0, help="bound on each wait, seconds")
    p.add_argument("--max-datagram-size", type=int, default=1500, help="QUIC max UDP payload (aioquic default 1200)")
    p.add_argument(
        "--no-h3-datagram",
        action="store_true",
        help="advertise neither SETTINGS_H3_DATAGRAM nor max_datagram_frame_size (capsule-only client, like curl)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    u = sub.add_parser("udp-echo", help="CONNECT-UDP to a UDP echo target")
    u.add_argument("--target", required=True, type=split_hostport, metavar="HOST:PORT")
    u.add_argument("--payload-sizes", default="0,10,1200", help="comma-separated UDP payload sizes")
    u.add_argument("--count", type=int, default=1, help="datagrams per size")
    u.add_argument("--send-as", choices=["datagram", "capsule"], help="default: datagram unless --no-h3-datagram")
    u.add_argument("--datagram-timeout", type=float, default=2.0, help="wait for each echo, seconds")
    u.add_argument("--retries", type=int, default=2, help="resends of a lost datagram")
    u.add_argument("--pvd", action="store_true", help="take the connect-udp template from the relay's PvD")

    t = sub.add_parser("tcp-echo", help="classic CONNECT to a TCP echo target")
    t.add_argument("--target", required=True, type=split_hostport, metavar="HOST:PORT")
    t.add_argument("--bytes", type=int, default=1 << 20)

    e = sub.add_parser("expect-status", help="send a crafted request, check the status")
    e.add_argument("--method", default="CONNECT")
    e.add_argument("--protocol", help=":protocol (e.g. connect-udp, or an unknown one for 501)")
    e.add_argument("--scheme", help=":scheme (default https when --protocol or --path is given)")
    e.add_argument("--path", help=":path")
    e.add_argument("--authority", help=":authority (default: none)")
    e.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    e.add_argument("--status", type=int, required=True)
    e.add_argument("--proxy-status-error", help="require error=THIS in Proxy-Status")
    e.add_argument("--no-proxy-status-check", action="store_true", help="do not require Proxy-Status on errors")

    a = p.parse_args(argv)
    a.relay_authority = authority(*a.relay)
    if a.cmd == "udp-echo":
        try:
            a.payload_sizes = [int(x) for x in a.payload_sizes.split(",") if x != ""]
        except ValueError:
            p.error(f"--payload-sizes: expected comma-separated integers, got {a.payload_sizes!r}")
        if a.send_as is None:
            a.send_as = "capsule" if a.no_h3_datagram else "datagram"
        if a.send_as == "datagram" and a.no_h3_datagram:
            p.error("--send-as datagram needs HTTP datagrams (drop --no-h3-datagram)")
    return a


async def run(a):
    host, port = a.relay
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.load_verify_locations(cafile=a.ca)
    config.server_name = a.server_name or host
    config.max_datagram_size = a.max_datagram_size
    config.idle_timeout = max(a.timeout * 3, 30.0)
    if not a.no_h3_datagram:
        config.max_datagram_frame_size = 65536
    MasqueProtocol.h3_datagram = not a.no_h3_datagram

    async def session():
        async with connect(
            host, port, configuration=config, create_protocol=MasqueProtocol, wait_connected=False
        ) as proto:
            proto.transmit()  # connect() sends the Initial only when it waits itself
            await wait(proto.wait_connected(), a.timeout, f"QUIC handshake with the relay {a.relay_authority}")
            command = {"udp-echo": cmd_udp_echo, "tcp-echo": cmd_tcp_echo, "expect-status": cmd_expect_status}
            try:
                return await command[a.cmd](a, proto)
            finally:
                settings = proto.h3.received_settings
                run.peer_settings = {f"0x{k:x}": v for k, v in (settings or {}).items()}
                proto.close()

    run.peer_settings = None
    # One outer bound for connect + command + close, on top of the per-wait bounds.
    budget = a.timeout * 4 + (a.bytes / 1e6 if a.cmd == "tcp-echo" else 0) + 10
    if a.cmd == "udp-echo":
        budget += len(a.payload_sizes) * a.count * (a.retries + 1) * a.datagram_timeout
    return await wait(session(), budget, "the whole session (connect, command, close)")


async def run_quietly(a):
    # aioquic leaves a failed handshake future unobserved; its "never retrieved" log is noise here
    # (the failure is reported in the JSON line).
    def handler(loop, ctx):
        if "never retrieved" not in ctx.get("message", ""):
            loop.default_exception_handler(ctx)

    asyncio.get_running_loop().set_exception_handler(handler)
    return await run(a)


def main(argv=None):
    a = parse_args(argv if argv is not None else sys.argv[1:])
    result = {"tool": "masque_aioquic", "cmd": a.cmd, "relay": a.relay_authority}
    if getattr(a, "target", None):
        result["target"] = authority(*a.target)
    started = time.monotonic()
    code = 0
    try:
        result.update(asyncio.run(run_quietly(a)))
        result["ok"] = True
    except Failure as f:
        msg = f.args[0]
        if len(f.args) > 1 and isinstance(f.args[1], dict):
            result.update(f.args[1])
        result.update(ok=False, error=msg)
        code = 1
    except (ConnectionError, OSError) as e:
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
        code = 1
    result["peer_settings"] = getattr(run, "peer_settings", None)
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    print(json.dumps(result), flush=True)
    if code:
        print(f"masque_aioquic: FAIL: {result['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
