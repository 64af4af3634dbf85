//! Client of a relay's TLS/TCP front-end, for networks that block UDP: HTTP/2 (classic CONNECT,
//! RFC 9113 §8.5; extended CONNECT with `:protocol connect-udp`, RFC 8441 + RFC 9298 §3.4) and
//! HTTP/1.1 (`CONNECT`, and the connect-udp Upgrade of RFC 9298 §3.3), over TLS with ALPN `h2` or
//! `http/1.1`. UDP travels in DATAGRAM capsules (RFC 9297 §3.5) on the tunnel's byte stream.
//!
//! [`FrontClient`] is what `cfr client` falls back to; [`H2Connection`], [`h1_request`] and
//! [`tls_connect`] are the building blocks, also used by the bench and the end-to-end tests on
//! any byte stream (e.g. a plain-TCP peer proxy).
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cfr_proto::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::config::{rustls_config_with_cert, RelayUrl};
use crate::{ClientConfig, ClientError, TcpTunnel, UdpTunnel};

/// How long to wait for the relay's response head (as over HTTP/3: only catches a silent relay).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 flow-control windows: large enough that a tunnel is limited by TCP, not by HTTP/2
/// (the relay's own are the same).
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;
const H2_SEND_BUFFER: usize = 1 << 20;
/// Largest write queued on an HTTP/2 stream at once.
const H2_MAX_WRITE: usize = 256 * 1024;

/// The HTTP version spoken to the front-end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrontVersion {
    H2,
    Http11,
}

impl FrontVersion {
    /// The ALPN token (RFC 7301) and the label the relay counts requests under.
    pub fn alpn(self) -> &'static str {
        match self {
            FrontVersion::H2 => "h2",
            FrontVersion::Http11 => "http/1.1",
        }
    }
}

impl std::fmt::Display for FrontVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrontVersion::H2 => "HTTP/2",
            FrontVersion::Http11 => "HTTP/1.1",
        })
    }
}

/// What to ask the relay for, as it goes on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontRequest {
    /// Classic CONNECT to an authority (`host:port`), sent as is.
    Connect(String),
    /// connect-udp with this request path (normally the RFC 9298 default template).
    ConnectUdp(String),
}

impl FrontRequest {
    pub fn tcp(target: &Target) -> FrontRequest {
        FrontRequest::Connect(cfr_proto::target::authority(target))
    }

    pub fn udp(target: &Target) -> FrontRequest {
        FrontRequest::ConnectUdp(cfr_proto::target::connect_udp_path(target))
    }

    /// Whether a response with `status` opened the tunnel on `version`.
    pub fn opened(&self, version: FrontVersion, status: http::StatusCode) -> bool {
        match (self, version) {
            (_, FrontVersion::H2) => status.is_success(),
            // RFC 9110 §9.3.6: any 2xx to CONNECT switches the connection to tunnel mode.
            (FrontRequest::Connect(_), FrontVersion::Http11) => status.is_success(),
            // RFC 9298 §3.3: the proxy answers the Upgrade with 101 (Switching Protocols).
            (FrontRequest::ConnectUdp(_), FrontVersion::Http11) => {
                status == http::StatusCode::SWITCHING_PROTOCOLS
            }
        }
    }
}

/// TLS client settings for the front-end: the config's trust anchors and client certificate,
/// offering `versions` by ALPN in order of preference.
pub fn tls_config(
    cfg: &ClientConfig,
    versions: &[FrontVersion],
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut tls = rustls_config_with_cert(&cfg.trust, cfg.client_cert.as_ref())?;
    tls.alpn_protocols = versions
        .iter()
        .map(|v| v.alpn().as_bytes().to_vec())
        .collect();
    Ok(Arc::new(tls))
}

/// TCP (no Nagle: tunnels carry interactive protocols) and TLS to `addr` as `server_name`.
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|_| ClientError::InvalidUrl(format!("{server_name:?} is not a valid TLS name")))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| ClientError::Connect(format!("TCP to {addr}: {e}")))?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(
            |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(tls) => ClientError::Tls(tls.to_string()),
                None => ClientError::Connect(format!("TLS handshake with {addr}: {e}")),
            },
        )
}

/// A header value we put on the wire must not end the line early (no request smuggling).
fn header_safe(what: &str, value: &str) -> io::Result<()> {
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a line break"),
        ));
    }
    Ok(())
}

/// Sends one HTTP/1.1 request on `io` — `CONNECT authority`, or for connect-udp `GET path` with
/// `Connection: Upgrade`, `Upgrade: connect-udp` and `Capsule-Protocol: ?1` (RFC 9298 §3.3) —
/// and reads the response head. When [`FrontRequest::opened`] says so, `io` is the tunnel from
/// the next byte on.
///
/// Written by hand rather than with hyper's client: the head is read byte by byte so that not a
/// byte of the tunnel is consumed with it, which leaves `io` itself as the tunnel (no upgrade
/// wrapper, no connection task) for the bench to compare against peer proxies.
pub async fn h1_request<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    req: &FrontRequest,
    host: &str,
    token: Option<&str>,
) -> io::Result<http::response::Parts> {
    header_safe("host", host)?;
    let mut head = match req {
        FrontRequest::Connect(authority) => {
            header_safe("CONNECT authority", authority)?;
            // RFC 9110 §9.3.6: the request target of CONNECT is the authority form.
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n")
        }
        FrontRequest::ConnectUdp(path) => {
            header_safe("connect-udp path", path)?;
            format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\nCapsule-Protocol: ?1\r\n"
            )
        }
    };
    if let Some(t) = token {
        header_safe("token", t)?;
        head.push_str(&format!("Proxy-Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    io.write_all(head.as_bytes()).await?;
    io.flush().await?;

    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if io.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "relay closed the connection before its response",
            ));
        }
        buf.push(byte[0]);
        if buf.len() > cfr_proto::http1::MAX_HEAD_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head too long",
            ));
        }
    }
    parse_response_head(&buf)
}

/// A complete HTTP/1.1 response head (parsed in the sans-IO proto crate, fuzzed there) as
/// [`http::response::Parts`].
fn parse_response_head(buf: &[u8]) -> io::Result<http::response::Parts> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let (head, _) = cfr_proto::http1::parse_response_head(buf)
        .map_err(|e| bad(format!("relay response head: {e}")))?;
    let mut builder = http::Response::builder().status(head.status);
    for (name, value) in &head.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|e| bad(format!("response head: {e}")))?
        .into_parts();
    Ok(parts)
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

/// The RST_STREAM (or GOAWAY) reason inside an error from an HTTP/2 tunnel.
pub fn h2_reason(e: &io::Error) -> Option<h2::Reason> {
    e.get_ref()?.downcast_ref::<h2::Error>()?.reason()
}

/// One HTTP/2 connection to a relay, driven by its own task; cheap to share. It closes once it
/// and every stream opened on it are dropped.
pub struct H2Connection {
    send: h2::client::SendRequest<Bytes>,
    ping: tokio::sync::Mutex<Option<h2::PingPong>>,
    /// Cancelled when the connection task ended.
    closed: CancellationToken,
    /// The relay's `host:port` for connect-udp's `:authority` (RFC 9298 §3.4).
    authority: String,
}

impl H2Connection {
    /// The HTTP/2 handshake on `io`, then one PING round trip: the relay's SETTINGS precede its
    /// PING ACK on the connection, so afterwards we know whether it allows extended CONNECT
    /// (RFC 8441 §3) without waiting on the clock.
    pub async fn handshake<IO>(io: IO, authority: &str) -> io::Result<H2Connection>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buffer_size(H2_SEND_BUFFER)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(h2_io)?;
        let ping = conn.ping_pong();
        let closed = CancellationToken::new();
        let on_close = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/2 connection to the relay ended");
            }
            on_close.cancel();
        });
        let c = H2Connection {
            send,
            ping: tokio::sync::Mutex::new(ping),
            closed,
            authority: authority.to_owned(),
        };
        c.ping().await?;
        Ok(c)
    }

    /// False once the connection is closed (GOAWAY, idle timeout, error).
    pub fn is_alive(&self) -> bool {
        !self.closed.is_cancelled()
    }

    /// Resolves when the connection is closed.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Whether the relay sent SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 (RFC 8441 §3).
    pub fn extended_connect(&self) -> bool {
        self.send.is_extended_connect_protocol_enabled()
    }

    /// One PING round trip (RFC 9113 §6.7).
    pub async fn ping(&self) -> io::Result<Duration> {
        let mut ping = self.ping.lock().await;
        let ping = ping
            .as_mut()
            .ok_or_else(|| io::Error::other("HTTP/2 PING handle already taken"))?;
        let started = Instant::now();
        ping.ping(h2::Ping::opaque()).await.map_err(h2_io)?;
        Ok(started.elapsed())
    }

    /// Classic CONNECT (`:authority` only, RFC 9113 §8.5) or extended CONNECT with
    /// `:protocol connect-udp` (RFC 8441 §4, RFC 9298 §3.4). Returns the response head and, for a
    /// 2xx, the tunnel.
    pub async fn request(
        &self,
        req: &FrontRequest,
        token: Option<&str>,
    ) -> io::Result<(http::response::Parts, Option<H2Stream>)> {
        let invalid = |e: http::Error| io::Error::new(io::ErrorKind::InvalidInput, e);
        let mut request = match req {
            FrontRequest::Connect(authority) => http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(
                    http::Uri::builder()
                        .authority(authority.as_str())
                        .build()
                        .map_err(invalid)?,
                )
                .body(())
                .map_err(invalid)?,
            FrontRequest::ConnectUdp(path) => {
                //= https://www.rfc-editor.org/rfc/rfc8441#section-3
                //# Upon receipt of SETTINGS_ENABLE_CONNECT_PROTOCOL with a value of 1, a client
                //# MAY use the Extended CONNECT as defined in this document when creating new
                //# streams.
                if !self.extended_connect() {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "relay did not send SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 (RFC 8441)",
                    ));
                }
                let mut r = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(
                        http::Uri::builder()
                            .scheme("https")
                            .authority(self.authority.as_str())
                            .path_and_query(path.as_str())
                            .build()
                            .map_err(invalid)?,
                    )
                    // RFC 9298 §3: "SHALL include a single Capsule-Protocol header field with a
                    // value of ?1".
                    .header("capsule-protocol", "?1")
                    .body(())
                    .map_err(invalid)?;
                r.extensions_mut()
                    .insert(h2::ext::Protocol::from_static("connect-udp"));
                r
            }
        };
        if let Some(t) = token {
            let v = http::HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            request
                .headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, v);
        }
        let mut send = self.send.clone().ready().await.map_err(h2_io)?;
        let (resp, send_stream) = send.send_request(request, false).map_err(h2_io)?;
        let resp = tokio::time::timeout(RESPONSE_TIMEOUT, resp)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response from the relay"))?
            .map_err(h2_io)?;
        let (head, recv) = resp.into_parts();
        if !head.status.is_success() {
            return Ok((head, None));
        }
        Ok((
            head,
            Some(H2Stream {
                send: H2Send { send: send_stream },
                recv: H2Recv {
                    recv,
                    leftover: Bytes::new(),
                    eof: false,
                },
            }),
        ))
    }
}

/// One HTTP/2 tunnel stream as a byte stream: `shutdown` sends END_STREAM (our FIN); dropping it
/// unfinished resets the stream (h2 sends RST_STREAM CANCEL), which aborts the destination side.
pub struct H2Stream {
    send: H2Send,
    recv: H2Recv,
}

impl H2Stream {
    /// Resets the stream with `reason` (RST_STREAM).
    pub fn reset(&mut self, reason: h2::Reason) {
        self.send.reset(reason);
    }
}

/// The receive half of an [`H2Stream`].
pub(crate) struct H2Recv {
    recv: h2::RecvStream,
    leftover: Bytes,
    eof: bool,
}

/// The send half of an [`H2Stream`].
pub(crate) struct H2Send {
    send: h2::SendStream<Bytes>,
}

impl H2Send {
    pub(crate) fn reset(&mut self, reason: h2::Reason) {
        self.send.send_reset(reason);
    }
}

impl AsyncRead for H2Recv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        crate::tcp::poll_read_chunks(&mut this.leftover, &mut this.eof, buf, || {
            Poll::Ready(match ready!(this.recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    // Window back as soon as the bytes are ours: the reader's pace is the
                    // back-pressure, not HTTP/2 flow control.
                    let _ = this.recv.flow_control().release_capacity(b.len());
                    Ok(Some(b))
                }
                Some(Err(e)) => Err(h2_io(e)),
                None => Ok(None),
            })
        })
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len().min(H2_MAX_WRITE));
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends queued data as the windows allow; nothing more a flush could force.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // RFC 9113 §8.5: END_STREAM is the TCP FIN of the tunnel.
        Poll::Ready(
            self.get_mut()
                .send
                .send_data(Bytes::new(), true)
                .map_err(h2_io),
        )
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().send).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}

/// An open tunnel on either HTTP version: the TLS connection itself on HTTP/1.1 (shutdown sends
/// close_notify + FIN), a stream of the shared connection on HTTP/2 (shutdown sends END_STREAM).
pub struct FrontStream {
    io: Either<TlsBox, H2Stream>,
}

type TlsBox = Box<TlsStream<TcpStream>>;

/// The receive half of a [`FrontStream`].
pub(crate) type FrontRecv = Either<tokio::io::ReadHalf<TlsBox>, H2Recv>;
/// The send half of a [`FrontStream`].
pub(crate) type FrontSend = Either<tokio::io::WriteHalf<TlsBox>, H2Send>;

impl FrontStream {
    /// The HTTP version the tunnel travels on.
    pub fn version(&self) -> FrontVersion {
        match self.io {
            Either::Left(_) => FrontVersion::Http11,
            Either::Right(_) => FrontVersion::H2,
        }
    }

    /// The HTTP/2 stream, to reset it by hand (tests).
    pub fn as_h2_mut(&mut self) -> Option<&mut H2Stream> {
        match &mut self.io {
            Either::Left(_) => None,
            Either::Right(s) => Some(s),
        }
    }

    /// The two directions, for a reader task and a writer task.
    pub(crate) fn split(self) -> (FrontRecv, FrontSend) {
        match self.io {
            Either::Left(s) => {
                let (r, w) = tokio::io::split(s);
                (Either::Left(r), Either::Left(w))
            }
            Either::Right(s) => (Either::Right(s.recv), Either::Right(s.send)),
        }
    }
}

/// Aborts a tunnel after the relay broke the protocol: RST_STREAM PROTOCOL_ERROR on HTTP/2
/// (RFC 9113 §8.1.1: a malformed message is a stream error); on HTTP/1.1 the connection closes
/// once both halves are dropped.
pub(crate) fn abort(send: &mut FrontSend) {
    if let Either::Right(s) = send {
        s.reset(h2::Reason::PROTOCOL_ERROR);
    }
}

forward_async_io!(FrontStream => io);

struct FrontInner {
    url: RelayUrl,
    tls: Arc<rustls::ClientConfig>,
    cfg: ClientConfig,
    version: FrontVersion,
    remote: Mutex<SocketAddr>,
    /// The shared HTTP/2 connection, re-established for new tunnels when it died.
    h2: tokio::sync::Mutex<Option<Arc<H2Connection>>>,
}

/// A client of one relay's TLS/TCP front-end. On HTTP/2 every tunnel is a stream of one shared
/// connection; on HTTP/1.1 every tunnel has its own TLS connection. Cheap to clone.
#[derive(Clone)]
pub struct FrontClient {
    inner: Arc<FrontInner>,
}

impl std::fmt::Debug for FrontClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontClient")
            .field("relay", &self.inner.url.authority)
            .field("version", &self.inner.version)
            .finish_non_exhaustive()
    }
}

/// `cfg.connect_timeout` around a connection step.
async fn bounded<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(ClientError::Timeout))
}

impl FrontClient {
    /// Connects to the relay URL's host and port over TCP, offering HTTP/2 then HTTP/1.1, and
    /// keeps the HTTP/2 connection if the relay picked `h2`.
    pub async fn connect(cfg: &ClientConfig) -> Result<FrontClient, ClientError> {
        Self::connect_offering(cfg, &[FrontVersion::H2, FrontVersion::Http11]).await
    }

    /// Like [`FrontClient::connect`], offering only `versions` (in order of preference).
    pub async fn connect_offering(
        cfg: &ClientConfig,
        versions: &[FrontVersion],
    ) -> Result<FrontClient, ClientError> {
        let url = RelayUrl::parse(&cfg.relay)?;
        let tls = tls_config(cfg, versions)?;
        let (stream, addr) = bounded(cfg.connect_timeout, open_tls(&url, tls.clone())).await?;
        let version = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => FrontVersion::H2,
            // No ALPN answer: a TLS server that only speaks HTTP/1.1.
            Some(b"http/1.1") | None => FrontVersion::Http11,
            Some(other) => {
                return Err(ClientError::Http(format!(
                    "relay chose ALPN {:?}",
                    String::from_utf8_lossy(other)
                )))
            }
        };
        if !versions.contains(&version) {
            return Err(ClientError::Http(format!(
                "relay chose {version}, not offered"
            )));
        }
        let h2 = match version {
            FrontVersion::H2 => Some(Arc::new(
                bounded(cfg.connect_timeout, h2_handshake(stream, &url)).await?,
            )),
            // Every HTTP/1.1 tunnel takes a connection of its own; this one only proved the way.
            FrontVersion::Http11 => None,
        };
        Ok(FrontClient {
            inner: Arc::new(FrontInner {
                url,
                tls,
                cfg: cfg.clone(),
                version,
                remote: Mutex::new(addr),
                h2: tokio::sync::Mutex::new(h2),
            }),
        })
    }

    /// Whether both are handles of the same client.
    pub(crate) fn same_as(&self, other: &FrontClient) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The HTTP version the relay chose.
    pub fn version(&self) -> FrontVersion {
        self.inner.version
    }

    /// The relay's TCP address of the last connection.
    pub fn remote_addr(&self) -> SocketAddr {
        *self.inner.remote.lock().unwrap()
    }

    /// The relay URL's `host:port`.
    pub fn relay_authority(&self) -> &str {
        &self.inner.url.authority
    }

    async fn h2(&self) -> Result<Arc<H2Connection>, ClientError> {
        let mut cur = self.inner.h2.lock().await;
        if let Some(c) = &*cur {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        *cur = None;
        let limit = self.inner.cfg.connect_timeout;
        let c = bounded(limit, async {
            let (stream, addr) = open_tls(&self.inner.url, self.inner.tls.clone()).await?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(ClientError::Http("relay no longer offers h2".into()));
            }
            *self.inner.remote.lock().unwrap() = addr;
            h2_handshake(stream, &self.inner.url).await
        })
        .await?;
        let c = Arc::new(c);
        *cur = Some(c.clone());
        Ok(c)
    }

    /// Sends `req` with `Proxy-Authorization: Bearer TOKEN` when `token` is set and returns the
    /// response head and, if it opened one, the tunnel. Refusals are answers, not errors.
    pub async fn request(
        &self,
        req: &FrontRequest,
        token: Option<&str>,
    ) -> Result<(http::response::Parts, Option<FrontStream>), ClientError> {
        match self.inner.version {
            FrontVersion::H2 => {
                let conn = self.h2().await?;
                let (head, stream) = conn.request(req, token).await.map_err(|e| {
                    if e.kind() == io::ErrorKind::Unsupported {
                        ClientError::NotSupported(e.to_string())
                    } else {
                        ClientError::Io(e)
                    }
                })?;
                Ok((
                    head,
                    stream.map(|s| FrontStream {
                        io: Either::Right(s),
                    }),
                ))
            }
            FrontVersion::Http11 => {
                let limit = self.inner.cfg.connect_timeout;
                let (mut stream, addr) =
                    bounded(limit, open_tls(&self.inner.url, self.inner.tls.clone())).await?;
                *self.inner.remote.lock().unwrap() = addr;
                let head = tokio::time::timeout(
                    RESPONSE_TIMEOUT,
                    h1_request(&mut stream, req, &self.inner.url.authority, token),
                )
                .await
                .map_err(|_| ClientError::Timeout)??;
                let opened = req.opened(FrontVersion::Http11, head.status);
                let io = Either::Left(Box::new(stream));
                Ok((head, opened.then_some(FrontStream { io })))
            }
        }
    }

    /// [`FrontClient::request`] with the configured token; a refusal is
    /// [`ClientError::Refused`].
    async fn open(
        &self,
        req: &FrontRequest,
    ) -> Result<(http::Response<()>, FrontStream), ClientError> {
        let (head, stream) = self.request(req, self.inner.cfg.token.as_deref()).await?;
        let response = http::Response::from_parts(head, ());
        match stream {
            Some(s) => Ok((response, s)),
            None => Err(crate::client::refusal(&response)),
        }
    }

    /// Opens a TCP tunnel (classic CONNECT).
    pub async fn connect_tcp(&self, target: &Target) -> Result<TcpTunnel, ClientError> {
        let (response, stream) = self.open(&FrontRequest::tcp(target)).await?;
        Ok(TcpTunnel::over_front(stream, response))
    }

    /// Opens a UDP tunnel (connect-udp); payloads travel in DATAGRAM capsules.
    pub async fn connect_udp(&self, target: &Target) -> Result<UdpTunnel, ClientError> {
        let path = self.inner.cfg.connect_udp_path(target);
        let (response, stream) = self.open(&FrontRequest::ConnectUdp(path)).await?;
        Ok(UdpTunnel::over_front(stream, response))
    }

    /// The relay's round-trip time: an HTTP/2 PING, or a TCP handshake on HTTP/1.1.
    pub async fn rtt_probe(&self) -> Result<Duration, ClientError> {
        let limit = self.inner.cfg.connect_timeout;
        match self.inner.version {
            FrontVersion::H2 => {
                let conn = self.h2().await?;
                bounded(limit, async { conn.ping().await.map_err(ClientError::Io) }).await
            }
            FrontVersion::Http11 => {
                let addr = self.remote_addr();
                let started = Instant::now();
                bounded(limit, async {
                    TcpStream::connect(addr)
                        .await
                        .map_err(|e| ClientError::Connect(format!("TCP to {addr}: {e}")))
                })
                .await?;
                Ok(started.elapsed())
            }
        }
    }
}

async fn h2_handshake(
    stream: TlsStream<TcpStream>,
    url: &RelayUrl,
) -> Result<H2Connection, ClientError> {
    H2Connection::handshake(stream, &url.authority)
        .await
        .map_err(|e| ClientError::Http(format!("HTTP/2 handshake: {e}")))
}

/// Resolves the relay's host and opens TLS to the first address that answers.
async fn open_tls(
    url: &RelayUrl,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(TlsStream<TcpStream>, SocketAddr), ClientError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| ClientError::Connect(format!("resolving {}: {e}", url.host)))?
        .collect();
    let mut last = ClientError::Connect(format!("{} has no address", url.host));
    for addr in addrs {
        match tls_connect(addr, &url.host, tls.clone()).await {
            Ok(s) => return Ok((s, addr)),
            // A certificate problem is the same on every address.
            Err(e @ ClientError::Tls(_)) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_head_parses_status_and_headers() {
        let head = parse_response_head(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: connect-udp\r\nCapsule-Protocol: ?1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.status, 101);
        assert_eq!(head.headers["capsule-protocol"], "?1");
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n").is_err());
    }

    #[test]
    fn opened_depends_on_method_and_version() {
        let tcp = FrontRequest::Connect("a:1".into());
        let udp = FrontRequest::ConnectUdp("/p".into());
        assert!(tcp.opened(FrontVersion::Http11, http::StatusCode::OK));
        assert!(!udp.opened(FrontVersion::Http11, http::StatusCode::OK));
        assert!(udp.opened(FrontVersion::Http11, http::StatusCode::SWITCHING_PROTOCOLS));
        assert!(udp.opened(FrontVersion::H2, http::StatusCode::OK));
        assert!(!tcp.opened(FrontVersion::H2, http::StatusCode::FORBIDDEN));
    }

    #[tokio::test]
    async fn h1_request_refuses_line_breaks_in_the_target() {
        let (mut a, _b) = tokio::io::duplex(1024);
        let req = FrontRequest::Connect("a:1\r\nX-Evil: 1".into());
        let err = h1_request(&mut a, &req, "relay:443", None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
