#!/usr/bin/env python3
"""A deliberately small MASQUE server (aioquic) used only to self-test the interop clients before the
real relay exists, and as a second implementation to compare against. NOT the relay under test.

Handles classic CONNECT (TCP) and CONNECT-UDP (datagrams when the client negotiated them, else
DATAGRAM capsules), no auth check beyond requiring a Proxy-Authorization header. Loopback only.

  interop/.venv/bin/python interop/selftest_masque_server.py --listen 127.0.0.1:0 --cert-dir DIR
prints {"listen": "127.0.0.1:PORT", "ca": "DIR/cert.pem"} and serves until killed or --max-secs.
"""

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import socket
import sys
from urllib.parse import unquote

from aioquic.asyncio import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, BufferReadError, encode_uint_var
from aioquic.h3.connection import H3_ALPN, H3Connection, Setting
from aioquic.h3.events import DataReceived, DatagramReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamReset

from masque_aioquic import CapsuleReader, split_hostport

PREFIX = "/.well-known/masque/udp/"


def make_cert(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


class ServerH3(H3Connection):
    def _get_local_settings(self):
        s = super()._get_local_settings()
        s[Setting.H3_DATAGRAM] = 1
        return s


class UdpForward:
    """A connected UDP socket. (asyncio's datagram transport silently drops empty payloads on
    Python < 3.12, and an empty UDP payload is valid in CONNECT-UDP.)"""

    def __init__(self, host, port, on_packet):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect((host, port))
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._readable, on_packet)

    def _readable(self, on_packet):
        try:
            on_packet(self.sock.recv(65536))
        except OSError:
            pass

    def sendto(self, data):
        try:
            self.sock.send(data)
        except OSError:
            pass

    def close(self):
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = ServerH3(self._quic)
        self.tunnels = {}  # stream id -> dict

    def peer_datagrams(self):
        s = self.h3.received_settings or {}
        return s.get(Setting.H3_DATAGRAM) == 1

    def respond(self, sid, status, extra=(), end=False):
        headers = [(b":status", str(status).encode())] + list(extra)
        if status >= 400:
            headers.append((b"proxy-status", b"selftest; error=http_request_error"))
        self.h3.send_headers(sid, headers, end_stream=end)
        self.transmit()

    def quic_event_received(self, event):
        if isinstance(event, StreamReset) and event.stream_id in self.tunnels:
            self.close_tunnel(event.stream_id)
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                asyncio.ensure_future(self.on_request(ev.stream_id, dict(ev.headers)))
            elif isinstance(ev, DataReceived):
                t = self.tunnels.get(ev.stream_id)
                if t is None:
                    continue
                if t["kind"] == "tcp":
                    t["writer"].write(ev.data)
                    if ev.stream_ended:
                        t["writer"].write_eof()
                else:
                    for value in t["capsules"].feed(ev.data):
                        self.udp_out(t, value)
                    if ev.stream_ended:
                        self.close_tunnel(ev.stream_id)
            elif isinstance(ev, DatagramReceived):
                t = self.tunnels.get(ev.stream_id)
                if t is not None and t["kind"] == "udp":
                    self.udp_out(t, ev.data)

    def udp_out(self, t, value):
        b = Buffer(data=value)
        try:
            if b.pull_uint_var() != 0:
                return  # unknown context: drop (RFC 9298 §4)
        except BufferReadError:
            return
        t["transport"].sendto(value[b.tell() :])

    def close_tunnel(self, sid):
        t = self.tunnels.pop(sid, None)
        if t is None:
            return
        if t["kind"] == "udp":
            t["transport"].close()
        else:
            t["writer"].close()

    async def on_request(self, sid, h):
        if h.get(b":method") != b"CONNECT":
            return self.respond(sid, 405, end=True)
        if b"proxy-authorization" not in h:
            return self.respond(sid, 407, end=True)
        proto = h.get(b":protocol")
        try:
            if proto is None:
                host, port = split_hostport(h[b":authority"].decode())
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                self.tunnels[sid] = {"kind": "tcp", "writer": writer}
                self.respond(sid, 200)
                asyncio.ensure_future(self.pump_tcp(sid, reader))
            elif proto == b"connect-udp":
                path = h.get(b":path", b"").decode()
                if not path.startswith(PREFIX):
                    return self.respond(sid, 400, end=True)
                host, port = path[len(PREFIX) :].strip("/").split("/")
                host = unquote(host)
                t = {"kind": "udp", "capsules": CapsuleReader()}
                t["transport"] = UdpForward(host, int(port), lambda data: self.udp_in(sid, data))
                self.tunnels[sid] = t
                self.respond(sid, 200, [(b"capsule-protocol", b"?1")])
            else:
                self.respond(sid, 501, end=True)
        except (OSError, ValueError, asyncio.TimeoutError):
            self.respond(sid, 502, end=True)

    def udp_in(self, sid, data):
        if sid not in self.tunnels:
            return
        value = encode_uint_var(0) + data
        if self.peer_datagrams():
            self.h3.send_datagram(sid, value)
        else:
            self.h3.send_data(sid, encode_uint_var(0) + encode_uint_var(len(value)) + value, end_stream=False)
        self.transmit()

    async def pump_tcp(self, sid, reader):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.h3.send_data(sid, data, end_stream=False)
                self.transmit()
            self.h3.send_data(sid, b"", end_stream=True)
            self.transmit()
        except (OSError, ConnectionError):
            self._quic.reset_stream(sid, 0x010F)  # H3_CONNECT_ERROR
            self.transmit()
        finally:
            self.tunnels.pop(sid, None)


async def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0", type=split_hostport)
    p.add_argument("--cert-dir", required=True)
    p.add_argument("--max-secs", type=float, default=600)
    a = p.parse_args()
    host, port = a.listen
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit("selftest server listens on loopback only")
    cert, key = make_cert(a.cert_dir)
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    config.max_datagram_size = 1500
    config.load_cert_chain(cert, key)
    server = await serve(host, port, configuration=config, create_protocol=Server)
    sockname = server._transport.get_extra_info("sockname")
    print(json.dumps({"listen": f"{host}:{sockname[1]}", "ca": cert}), flush=True)
    await asyncio.sleep(a.max_secs)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
