//! What every measurement runs against: a dev PKI in a temp dir, an in-process relay on loopback,
//! loopback origins, and a raw quinn server with the relay's transport config.
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use cfr_client::{ClientConfig, RelayClient, Trust};
use cfr_relay::config::RelayConfig;
use cfr_relay::tls::DevPki;
use cfr_relay::{HostsThenSystem, Relay, RelayHandle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// Bearer token the bench relay accepts.
pub const TOKEN: &str = "cfr-bench-token";

/// Tasks aborted when dropped: every server the bench starts lives in one of these.
#[derive(Default)]
pub struct Tasks(std::sync::Mutex<Vec<JoinHandle<()>>>);

impl Tasks {
    pub fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.lock().unwrap().push(tokio::spawn(f));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in self.0.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// The relay configuration of the bench: loopback, the bench token, loopback destinations allowed,
/// and limits raised far above what the scale and setup-rate measurements open.
pub fn relay_config(pki: &DevPki, dir: &std::path::Path) -> RelayConfig {
    let mut cfg = RelayConfig {
        listen: "127.0.0.1:0".parse().expect("static address"),
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        state_dir: dir.to_owned(),
        drain_secs: 1,
        ..RelayConfig::default()
    };
    cfg.auth.token_sha256 = vec![cfr_relay::config::TokenHash::of(TOKEN)];
    cfg.policy.allow = vec!["127.0.0.0/8".parse().expect("static net")];
    // Defaults are 256 tunnels per connection and 32 connections per client address: the scale
    // run holds 10 000 tunnels and the setup-rate run 64 connections from 127.0.0.1.
    cfg.limits.tunnels_per_connection = 2048;
    cfg.limits.total_tunnels = 65_536;
    cfg.limits.connections_per_client = 1024;
    cfg.limits.total_connections = 4096;
    // The setup-rate run opens hundreds of connections a second from one address; the flood run
    // thousands. Address validation (Retry) would add a round trip to each.
    cfg.limits.handshakes_per_sec_per_client = 1_000_000;
    cfg.limits.half_open_before_retry = 100_000;
    cfg
}

/// The in-process relay and what clients need to reach it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
    pub relay_addr: SocketAddr,
    /// The TLS/TCP (HTTP/2, HTTP/1.1) front-end, when this relay has one.
    pub tcp_front: Option<SocketAddr>,
    pub core: Arc<cfr_relay::tunnel::Core>,
    handle: RelayHandle,
    relay_task: Option<JoinHandle<()>>,
    pub tasks: Tasks,
}

impl Env {
    pub async fn start() -> Result<Env, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let pki = cfr_relay::tls::generate_dev_pki(dir.path(), &[]).map_err(|e| e.to_string())?;
        let cfg = relay_config(&pki, dir.path());
        let resolver = Arc::new(HostsThenSystem {
            hosts: cfg.resolver.hosts.clone(),
            hosts_only: true,
        });
        let relay = Relay::bind(cfg, resolver, &[])
            .await
            .map_err(|e| format!("relay: {e}"))?;
        let relay_addr = relay.local_addr();
        let tcp_front = relay.tcp_addr();
        let core = relay.core().clone();
        let handle = relay.handle();
        let relay_task = Some(tokio::spawn(relay.run()));
        Ok(Env {
            dir,
            pki,
            relay_addr,
            tcp_front,
            core,
            handle,
            relay_task,
            tasks: Tasks::default(),
        })
    }

    pub fn client_config(&self) -> ClientConfig {
        client_config(self.relay_addr, &self.pki)
    }

    pub async fn client(&self) -> Result<RelayClient, String> {
        RelayClient::connect(self.client_config())
            .await
            .map_err(|e| format!("client: {e}"))
    }

    /// The relay's QUIC transport settings (the raw quinn baseline uses the same).
    pub fn transport(&self) -> Arc<quinn::TransportConfig> {
        Arc::new(cfr_relay::http3::transport_config(&self.core.config))
    }

    /// Drains the relay (bounded) and stops every server task.
    pub async fn stop(mut self) {
        self.handle.shutdown();
        if let Some(t) = self.relay_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(t) = self.relay_task.take() {
            t.abort();
        }
    }
}

/// A client of the relay at `addr` trusting the bench's dev CA.
pub fn client_config(addr: SocketAddr, pki: &DevPki) -> ClientConfig {
    let mut c = ClientConfig::new(
        format!("https://{}:{}", addr.ip(), addr.port()),
        Trust::CaFile(pki.ca_cert.clone()),
    );
    c.token = Some(TOKEN.to_owned());
    c
}

pub fn target(addr: SocketAddr) -> cfr_proto::Target {
    cfr_proto::Target {
        host: cfr_proto::Host::Ip(addr.ip()),
        port: addr.port(),
    }
}

// ---- bulk protocol: [op: b'U' | b'D'][len: u64 BE]; U: origin reads len bytes and answers the
// count (8 bytes); D: origin writes len bytes. Then the origin reads to EOF before closing. ----

const CHUNK: usize = 64 * 1024;

pub async fn serve_bulk<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    let mut hdr = [0u8; 9];
    s.read_exact(&mut hdr).await?;
    let len = u64::from_be_bytes(hdr[1..].try_into().expect("8 bytes"));
    let mut buf = vec![0u8; 4 * CHUNK];
    match hdr[0] {
        b'U' => {
            let mut got = 0u64;
            while got < len {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            s.write_all(&got.to_be_bytes()).await?;
            s.flush().await?;
        }
        b'D' => {
            buf.fill(0x5a);
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.flush().await?;
        }
        _ => return Err(io::Error::other("unknown bulk op")),
    }
    // Wait for the client to close so neither side resets a connection with unread data.
    while s.read(&mut buf).await? > 0 {}
    let _ = s.shutdown().await;
    Ok(())
}

/// Direction of a bulk transfer, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client → origin.
    Up,
    /// Origin → client.
    Down,
}

impl Dir {
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

/// Runs one bulk transfer on an open stream; returns when the last byte is confirmed (up) or
/// received (down).
pub async fn bulk_client<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    dir: Dir,
    len: u64,
) -> io::Result<()> {
    let mut hdr = [0u8; 9];
    hdr[0] = if dir == Dir::Up { b'U' } else { b'D' };
    hdr[1..].copy_from_slice(&len.to_be_bytes());
    s.write_all(&hdr).await?;
    let mut buf = vec![0x33u8; 4 * CHUNK];
    match dir {
        Dir::Up => {
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.flush().await?;
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack).await?;
            if u64::from_be_bytes(ack) != len {
                return Err(io::Error::other("origin received a different byte count"));
            }
        }
        Dir::Down => {
            s.flush().await?;
            let mut got = 0u64;
            while got < len {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("stream ended after {got} of {len} bytes"),
                    ));
                }
                got += n as u64;
            }
        }
    }
    Ok(())
}

/// Origin for bulk transfers (plain TCP).
pub async fn bulk_origin(tasks: &Tasks) -> io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tasks.spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let _ = serve_bulk(s).await;
            });
        }
    });
    Ok(addr)
}

/// Origin that accepts and holds each connection until the peer closes it (idle tunnels, tunnel
/// setup). Its connection tasks end with their peers.
/// [`hold_origin`] for a section: on failure records `name` as unavailable and returns `None`.
pub async fn origin_or_unavailable(
    env: &Env,
    rows: &mut Vec<crate::report::Row>,
    section: &'static str,
    name: &'static str,
    unit: &'static str,
) -> Option<SocketAddr> {
    match hold_origin(&env.tasks).await {
        Ok(a) => Some(a),
        Err(e) => {
            rows.push(crate::report::Row::unavailable(
                section,
                name,
                unit,
                format!("origin: {e}"),
            ));
            None
        }
    }
}

pub async fn hold_origin(tasks: &Tasks) -> io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tasks.spawn(async move {
        loop {
            match l.accept().await {
                Ok((mut s, _)) => {
                    tokio::spawn(async move {
                        let mut b = [0u8; 64];
                        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    });
                }
                // EMFILE under the scale run: back off rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    });
    Ok(addr)
}

/// UDP echo origin: a destination as cheap per datagram as the raw quinn client is on the
/// baseline path, so the tunnel rows measure the relay rather than the origin. Reads with
/// recvmmsg + UDP GRO and echoes each received train (datagrams of one size from one sender) back
/// with one UDP GSO send, both through quinn-udp, the socket layer the raw quinn peers use.
pub async fn udp_echo(tasks: &Tasks) -> io::Result<SocketAddr> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    let _ = socket_buffers(&s, 4 << 20);
    let state = quinn_udp::UdpSocketState::new((&s).into())?;
    let addr = s.local_addr()?;
    tasks.spawn(async move {
        const BATCH: usize = 16;
        const SLOT: usize = 1 << 16;
        let mut slots = vec![0u8; BATCH * SLOT];
        let mut bufs: Vec<io::IoSliceMut<'_>> =
            slots.chunks_mut(SLOT).map(io::IoSliceMut::new).collect();
        let mut meta = [quinn_udp::RecvMeta::default(); BATCH];
        loop {
            let received = s
                .async_io(tokio::io::Interest::READABLE, || {
                    state.recv((&s).into(), &mut bufs, &mut meta)
                })
                .await;
            let Ok(n) = received else {
                // An ICMP error reported on the socket: not a reason to stop, nor to spin.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            };
            for (buf, m) in bufs.iter().zip(&meta).take(n) {
                let transmit = quinn_udp::Transmit {
                    destination: m.addr,
                    ecn: None,
                    contents: &buf[..m.len],
                    // One datagram (no GSO) unless the train holds several.
                    segment_size: (m.stride < m.len).then_some(m.stride),
                    src_ip: None,
                };
                // Dropped when the socket buffer is full, as a plain echo would.
                let _ = s.try_io(tokio::io::Interest::WRITABLE, || {
                    state.try_send((&s).into(), &transmit)
                });
            }
        }
    });
    Ok(addr)
}

/// Larger socket buffers for UDP sockets the bench owns (the kernel caps them at rmem_max).
pub fn socket_buffers(s: &UdpSocket, bytes: usize) -> io::Result<()> {
    let r = socket2::SockRef::from(s);
    r.set_recv_buffer_size(bytes)?;
    r.set_send_buffer_size(bytes)
}

pub async fn direct_tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A read half and a write half as one `AsyncRead + AsyncWrite` (quinn streams).
pub struct Duplex<R, W> {
    pub r: R,
    pub w: W,
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Duplex<R, W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.r).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Duplex<R, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.w).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.w).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.w).poll_shutdown(cx)
    }
}

// ---- raw quinn: the QUIC ceiling, with the relay's transport config on both sides ----

/// A raw quinn server: bidirectional streams speak the bulk protocol, datagrams are echoed.
pub fn quic_server(env: &Env) -> Result<SocketAddr, String> {
    let ep = quic_endpoint(Some(quic_server_config(env)?)).map_err(|e| e.to_string())?;
    let addr = ep.local_addr().map_err(|e| e.to_string())?;
    env.tasks.spawn(serve_quic(ep));
    Ok(addr)
}

/// A loopback quinn endpoint whose socket has the same 4 MiB buffers as the relay's and the
/// client's, so the raw quinn baseline loses no more to a full socket than they do.
pub fn quic_endpoint(server: Option<quinn::ServerConfig>) -> io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let buffers = socket2::SockRef::from(&socket);
    buffers.set_recv_buffer_size(4 << 20)?;
    buffers.set_send_buffer_size(4 << 20)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The raw quinn server's configuration: the bench certificate and the relay's transport.
pub fn quic_server_config(env: &Env) -> Result<quinn::ServerConfig, String> {
    let tls =
        cfr_relay::tls::server_config(&env.pki.server_cert, &env.pki.server_key, None, &[b"bench"])
            .map_err(|e| e.to_string())?;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(env.transport());
    Ok(sc)
}

/// Serves [`quic_server`]'s protocol on `ep` until the endpoint closes.
pub async fn serve_quic(ep: quinn::Endpoint) {
    while let Some(inc) = ep.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = inc.await else { return };
            let echo = conn.clone();
            let dg = tokio::spawn(async move {
                while let Ok(d) = echo.read_datagram().await {
                    let _ = echo.send_datagram(d);
                }
            });
            while let Ok((w, r)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let _ = serve_bulk(Duplex { r, w }).await;
                });
            }
            dg.abort();
        });
    }
}

/// A raw quinn client connection to [`quic_server`].
pub async fn quic_client(
    env: &Env,
    server: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    quic_client_with(env, server, env.transport()).await
}

/// [`quic_client`] with another transport configuration.
pub async fn quic_client_with(
    env: &Env,
    server: SocketAddr,
    transport: Arc<quinn::TransportConfig>,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let mut cc = quic_client_config(env, b"bench")?;
    cc.transport_config(transport);
    let mut ep = quic_endpoint(None).map_err(|e| e.to_string())?;
    ep.set_default_client_config(cc);
    let conn = ep
        .connect(server, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok((ep, conn))
}

/// A quinn client configuration (TLS 1.3, ALPN `alpn`) that trusts the bench PKI.
pub fn quic_client_config(env: &Env, alpn: &[u8]) -> Result<quinn::ClientConfig, String> {
    let pem = std::fs::read(&env.pki.ca_cert).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(cfr_relay::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Waits until QUIC path MTU discovery lets a `payload`-byte datagram through (bounded).
pub async fn wait_datagram_room(conn: &quinn::Connection, payload: usize) -> bool {
    for _ in 0..200 {
        if conn.max_datagram_size().is_some_and(|m| m >= payload) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// A 1200-byte UDP payload, shared by every sender (cloning `Bytes` is free).
pub fn payload(len: usize) -> Bytes {
    Bytes::from(vec![0x42u8; len])
}
