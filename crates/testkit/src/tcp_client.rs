//! Clients of the relay's TLS/TCP front-end for tests: HTTP/1.1 (hyper, CONNECT and the RFC 9298
//! §3.3 Upgrade) and HTTP/2 (h2, CONNECT and RFC 8441 extended CONNECT), over tokio-rustls with
//! the ring provider, trusting a PEM CA file. Tunnels expose bytes and DATAGRAM capsules the same
//! way on both versions, so a test can run one scenario over each.
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cfr_proto::capsule::{self, Capsule, CapsuleDecoder};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

use crate::origins::ring_provider;

/// Bound for every step of these clients.
const STEP: Duration = Duration::from_secs(10);

/// Which HTTP version talks to the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    H1,
    H2,
}

impl Front {
    /// The `protocol` label the relay counts this front-end's requests under.
    pub fn label(self) -> &'static str {
        match self {
            Front::H1 => "http/1.1",
            Front::H2 => "h2",
        }
    }
}

/// What to ask the relay for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Classic CONNECT to an authority (`host:port`), sent as is.
    Connect(String),
    /// connect-udp with this request path (normally the RFC 9298 default template).
    ConnectUdp(String),
}

impl Ask {
    pub fn tcp(addr: SocketAddr) -> Ask {
        Ask::Connect(cfr_proto::target::authority(&crate::relay::target(addr)))
    }

    pub fn udp(addr: SocketAddr) -> Ask {
        Ask::ConnectUdp(cfr_proto::target::connect_udp_path(&crate::relay::target(
            addr,
        )))
    }
}

fn timeout_err(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> io::Result<T> {
    tokio::time::timeout(STEP, f)
        .await
        .map_err(|_| timeout_err(what))
}

/// TLS to the relay as `localhost`, trusting `ca_pem`, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &Path,
    alpn: &[&[u8]],
) -> io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in cfr_relay::tls::load_certs(ca_pem).map_err(io::Error::other)? {
        roots.add(c).map_err(io::Error::other)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = bounded("TCP connect", TcpStream::connect(addr)).await??;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("static name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    bounded("TLS handshake", tls.connect(name, tcp)).await?
}

/// A client of one relay front-end. HTTP/2 multiplexes every request on one connection; HTTP/1.1
/// opens a connection per request (a tunnel takes its connection over).
pub struct FrontClient {
    pub front: Front,
    addr: SocketAddr,
    ca_pem: std::path::PathBuf,
    h2: Option<H2Conn>,
}

impl FrontClient {
    pub async fn connect(front: Front, addr: SocketAddr, ca_pem: &Path) -> io::Result<FrontClient> {
        let h2 = match front {
            Front::H2 => Some(H2Conn::connect(addr, ca_pem).await?),
            Front::H1 => None,
        };
        Ok(FrontClient {
            front,
            addr,
            ca_pem: ca_pem.to_owned(),
            h2,
        })
    }

    /// Sends `ask` with `Proxy-Authorization: Bearer TOKEN` when `token` is set. Returns the
    /// response head and, for a 2xx (HTTP/2) or 200/101 (HTTP/1.1), the tunnel.
    pub async fn request(
        &self,
        ask: &Ask,
        token: Option<&str>,
    ) -> io::Result<(http::response::Parts, Option<Tunnel>)> {
        match &self.h2 {
            Some(h2) => {
                let (head, stream) = h2.request(ask, token).await?;
                Ok((head, stream.map(Tunnel::H2)))
            }
            None => {
                let (head, io) = h1_request(self.addr, &self.ca_pem, ask, token).await?;
                Ok((head, io.map(Tunnel::H1)))
            }
        }
    }

    /// Like `request`, but a refusal is an error naming the status.
    pub async fn open(&self, ask: &Ask, token: Option<&str>) -> io::Result<Tunnel> {
        let (head, tunnel) = self.request(ask, token).await?;
        tunnel.ok_or_else(|| {
            io::Error::other(format!(
                "{:?} {ask:?}: refused with {} ({:?})",
                self.front,
                head.status,
                head.headers.get("proxy-status")
            ))
        })
    }
}

fn bearer(token: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(&format!("Bearer {token}")).expect("token is header-safe")
}

/// One HTTP/1.1 request on a fresh connection: `CONNECT authority` or the connect-udp Upgrade
/// (RFC 9298 §3.3: `GET` + `Connection: Upgrade` + `Upgrade: connect-udp` + `Capsule-Protocol`).
pub async fn h1_request(
    addr: SocketAddr,
    ca_pem: &Path,
    ask: &Ask,
    token: Option<&str>,
) -> io::Result<(http::response::Parts, Option<TokioIo<Upgraded>>)> {
    let tls = tls_connect(addr, ca_pem, &[b"http/1.1"]).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(io::Error::other)?;
    tokio::spawn(conn.with_upgrades());
    let host = format!("localhost:{}", addr.port());
    let mut req = match ask {
        Ask::Connect(authority) => http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority.as_str())
            .header(http::header::HOST, authority.as_str()),
        Ask::ConnectUdp(path) => http::Request::builder()
            .method(http::Method::GET)
            .uri(path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, "connect-udp")
            .header("capsule-protocol", "?1"),
    }
    .body(Empty::new())
    .map_err(io::Error::other)?;
    if let Some(t) = token {
        req.headers_mut()
            .insert(http::header::PROXY_AUTHORIZATION, bearer(t));
    }
    let resp = bounded("HTTP/1.1 response", send.send_request(req))
        .await?
        .map_err(io::Error::other)?;
    let opened = match ask {
        Ask::Connect(_) => resp.status() == http::StatusCode::OK,
        Ask::ConnectUdp(_) => resp.status() == http::StatusCode::SWITCHING_PROTOCOLS,
    };
    if !opened {
        let (head, _) = resp.into_parts();
        return Ok((head, None));
    }
    let (head, body) = resp.into_parts();
    let upgraded = bounded(
        "HTTP/1.1 upgrade",
        hyper::upgrade::on(http::Response::from_parts(head.clone(), body)),
    )
    .await?
    .map_err(io::Error::other)?;
    Ok((head, Some(TokioIo::new(upgraded))))
}

/// An HTTP/2 connection to the relay (ALPN `h2`), driven by its own task.
pub struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    task: JoinHandle<()>,
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Conn {
    /// Connects and waits for the relay's SETTINGS to allow extended CONNECT (RFC 8441 §3).
    pub async fn connect(addr: SocketAddr, ca_pem: &Path) -> io::Result<H2Conn> {
        let tls = tls_connect(addr, ca_pem, &[b"h2"]).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if alpn.as_deref() != Some(b"h2") {
            return Err(io::Error::other(format!(
                "relay did not negotiate h2 (ALPN {alpn:?})"
            )));
        }
        let (send, conn) = bounded("HTTP/2 handshake", h2::client::handshake(tls))
            .await?
            .map_err(io::Error::other)?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = bounded("HTTP/2 ready", send.ready())
            .await?
            .map_err(io::Error::other)?;
        let settled = bounded("SETTINGS_ENABLE_CONNECT_PROTOCOL", async {
            // The flag arrives with the server's first SETTINGS frame, processed by the task.
            while !send.is_extended_connect_protocol_enabled() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if settled.is_err() {
            return Err(io::Error::other(
                "relay did not send SETTINGS_ENABLE_CONNECT_PROTOCOL = 1",
            ));
        }
        send = bounded("HTTP/2 ready", send.ready())
            .await?
            .map_err(io::Error::other)?;
        Ok(H2Conn { send, task })
    }

    /// Classic CONNECT (`:authority` only, RFC 9113 §8.5) or extended CONNECT with
    /// `:protocol connect-udp` (RFC 8441 §4, RFC 9298 §3.4).
    pub async fn request(
        &self,
        ask: &Ask,
        token: Option<&str>,
    ) -> io::Result<(http::response::Parts, Option<H2Stream>)> {
        let mut req = match ask {
            Ask::Connect(authority) => http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority.as_str())
                .body(())
                .map_err(io::Error::other)?,
            Ask::ConnectUdp(path) => {
                let mut req = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(format!("https://localhost{path}"))
                    .header("capsule-protocol", "?1")
                    .body(())
                    .map_err(io::Error::other)?;
                req.extensions_mut()
                    .insert(h2::ext::Protocol::from_static("connect-udp"));
                req
            }
        };
        if let Some(t) = token {
            req.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, bearer(t));
        }
        let mut send = bounded("HTTP/2 ready", self.send.clone().ready())
            .await?
            .map_err(io::Error::other)?;
        let (resp, send_stream) = send.send_request(req, false).map_err(h2_io)?;
        let resp = bounded("HTTP/2 response", resp).await?.map_err(h2_io)?;
        let (head, recv) = resp.into_parts();
        if !head.status.is_success() {
            return Ok((head, None));
        }
        Ok((
            head,
            Some(H2Stream {
                send: send_stream,
                recv,
            }),
        ))
    }
}

/// h2 errors as io errors that keep the h2 error (and its reset reason) inside.
fn h2_io(e: h2::Error) -> io::Error {
    let kind = if e.reason().is_some() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// The RST_STREAM reason inside an error from an HTTP/2 tunnel, if the stream was reset.
pub fn h2_reason(e: &io::Error) -> Option<h2::Reason> {
    e.get_ref()?.downcast_ref::<h2::Error>()?.reason()
}

/// One HTTP/2 tunnel stream.
pub struct H2Stream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
}

impl H2Stream {
    /// Queues data (h2 buffers what the window does not allow yet).
    pub fn send(&mut self, data: Bytes, end_stream: bool) -> io::Result<()> {
        self.send.send_data(data, end_stream).map_err(h2_io)
    }

    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match self.recv.data().await {
            Some(Ok(b)) => {
                let _ = self.recv.flow_control().release_capacity(b.len());
                Ok(Some(b))
            }
            Some(Err(e)) => Err(h2_io(e)),
            None => Ok(None),
        }
    }

    pub fn reset(&mut self, reason: h2::Reason) {
        self.send.send_reset(reason);
    }
}

/// An open tunnel on either front-end.
pub enum Tunnel {
    H1(TokioIo<Upgraded>),
    H2(H2Stream),
}

impl Tunnel {
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Tunnel::H1(io) => {
                io.write_all(data).await?;
                io.flush().await
            }
            Tunnel::H2(s) => s.send(Bytes::copy_from_slice(data), false),
        }
    }

    /// Our FIN: TLS close_notify + TCP FIN on HTTP/1.1, END_STREAM on HTTP/2.
    pub async fn finish(&mut self) -> io::Result<()> {
        match self {
            Tunnel::H1(io) => io.shutdown().await,
            Tunnel::H2(s) => s.send(Bytes::new(), true),
        }
    }

    /// The next bytes; `None` at a clean end of stream.
    pub async fn read(&mut self) -> io::Result<Option<Bytes>> {
        match self {
            Tunnel::H1(io) => {
                let mut buf = BytesMut::with_capacity(16 * 1024);
                let n = io.read_buf(&mut buf).await?;
                Ok((n > 0).then(|| buf.freeze()))
            }
            Tunnel::H2(s) => s.recv().await,
        }
    }

    /// Everything until a clean end of stream, bounded by `limit`.
    pub async fn read_to_end(&mut self, limit: Duration) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        tokio::time::timeout(limit, async {
            while let Some(b) = self.read().await? {
                all.extend_from_slice(&b);
            }
            Ok::<_, io::Error>(())
        })
        .await
        .map_err(|_| timeout_err("reading the tunnel to its end"))??;
        Ok(all)
    }

    /// Treats the tunnel as a capsule stream (connect-udp).
    pub fn into_capsules(self) -> CapsuleTunnel {
        CapsuleTunnel {
            inner: self,
            decoder: CapsuleDecoder::new(cfr_proto::datagram::MAX_UDP_PAYLOAD + 8),
        }
    }
}

/// A connect-udp tunnel carrying DATAGRAM capsules (RFC 9297 §3.5) with context ID 0.
pub struct CapsuleTunnel {
    pub inner: Tunnel,
    decoder: CapsuleDecoder,
}

impl CapsuleTunnel {
    /// Sends one UDP payload as a DATAGRAM capsule.
    pub async fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut c = Vec::with_capacity(payload.len() + 8);
        capsule::encode_datagram(cfr_proto::datagram::UDP_PAYLOAD_CONTEXT, payload, &mut c);
        self.inner.write(&c).await
    }

    /// The next UDP payload (context 0), skipping other capsules; errors at end of stream.
    pub async fn recv(&mut self) -> io::Result<Bytes> {
        loop {
            match self.decoder.next_capsule() {
                Ok(Some(Capsule::Datagram {
                    context_id: 0,
                    data,
                })) => return Ok(data),
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => return Err(io::Error::other(format!("bad capsule from relay: {e:?}"))),
            }
            match self.inner.read().await? {
                Some(chunk) => self.decoder.push(&chunk),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "capsule stream ended",
                    ))
                }
            }
        }
    }
}
