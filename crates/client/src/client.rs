//! One QUIC connection to a relay, shared by many tunnels, re-established for new tunnels when
//! it dies.
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cfr_proto::{datagram, Target};
use h3::ConnectionState;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::{quinn_client_config, RelayUrl};
use crate::{ClientConfig, ClientError, DatagramMode, TcpTunnel, UdpTunnel};

/// An HTTP/3 request stream to the relay.
pub type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;
type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// How long to wait for the relay's response headers to a CONNECT. The relay bounds its own DNS
/// and connect timeouts well below this; this only catches a relay that went silent.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Per-tunnel queue of received UDP payloads (QUIC datagrams and capsules alike). Full → drop.
pub(crate) const UDP_QUEUE: usize = 512;

/// A tunnel opened with [`RelayClient::send_request`]: the relay's response and the raw stream.
pub struct RawTunnel {
    pub response: http::Response<()>,
    pub stream: H3Stream,
    /// The QUIC connection the stream belongs to (to send hand-made QUIC datagrams).
    pub quic: quinn::Connection,
}

impl RawTunnel {
    /// The request stream's quarter stream ID (RFC 9297 §2.1), for hand-made datagrams.
    pub fn quarter_stream_id(&self) -> u64 {
        datagram::quarter_stream_id(self.stream.id().into_inner())
    }
}

/// Routes received QUIC datagrams to tunnels by quarter stream ID.
#[derive(Default)]
pub(crate) struct Routes {
    map: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    /// Datagrams dropped: unknown stream, unknown context ID, or full tunnel queue.
    pub(crate) dropped: Arc<AtomicU64>,
}

impl Routes {
    pub(crate) fn insert(&self, qsid: u64, tx: mpsc::Sender<Bytes>) {
        self.map.lock().unwrap().insert(qsid, tx);
    }
    pub(crate) fn remove(&self, qsid: u64) {
        self.map.lock().unwrap().remove(&qsid);
    }
    fn route(&self, qsid: u64, data: Bytes) {
        let delivered = match self.map.lock().unwrap().get(&qsid) {
            Some(tx) => tx.try_send(data).is_ok(),
            // RFC 9297 §2.1: a datagram for a stream that does not exist (yet, or any more) is
            // dropped or buffered briefly; we drop.
            None => false,
        };
        if !delivered {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The relay's HTTP/3 SETTINGS we care about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerSettings {
    extended_connect: bool,
    h3_datagram: bool,
}

/// One live QUIC + HTTP/3 connection.
pub(crate) struct Conn {
    pub(crate) quic: quinn::Connection,
    send_request: Mutex<SendRequest>,
    pub(crate) routes: Arc<Routes>,
    settings: PeerSettings,
    dead: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    endpoint: quinn::Endpoint,
}

/// How long a connection whose last handle was dropped stays open so that data already written
/// to its streams (a tunnel dropped right after `shutdown`) is delivered: until the relay closes it
/// (a draining relay does once its last request ended) or this long at most.
const LINGER: Duration = Duration::from_secs(10);

/// Receive buffer of the client's QUIC socket.
const QUIC_RECV_BUFFER: usize = 4 << 20;

impl Drop for Conn {
    fn drop(&mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tasks.iter().for_each(JoinHandle::abort);
            return;
        };
        // Dropping the last QUIC/h3 handles closes the connection at once, discarding stream data
        // not yet acknowledged. Keep them (and the h3 driver) alive a little longer instead.
        let quic = self.quic.clone();
        let keep = (
            self.send_request.lock().unwrap().clone(),
            self.endpoint.clone(),
        );
        rt.spawn(async move {
            let _ = tokio::time::timeout(LINGER, quic.closed()).await;
            quic.close(quinn::VarInt::from_u32(0x100), b"");
            drop(keep);
            tasks.iter().for_each(JoinHandle::abort);
        });
    }
}

impl Conn {
    /// Stops using this connection for new tunnels; tunnels already on it are unaffected.
    fn retire(&self) {
        self.dead.store(true, Ordering::Release);
    }

    fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire) && self.quic.close_reason().is_none()
    }

    /// Whether UDP payloads go in QUIC DATAGRAM frames: RFC 9297 §2.1.1 — only if the peer sent
    /// SETTINGS_H3_DATAGRAM=1 *and* the QUIC max_datagram_frame_size parameter.
    pub(crate) fn quic_datagrams(&self, mode: DatagramMode) -> bool {
        mode == DatagramMode::Auto
            && self.settings.h3_datagram
            && self.quic.max_datagram_size().is_some()
    }

    async fn establish(
        cfg: &ClientConfig,
        url: &RelayUrl,
    ) -> Result<(Conn, SocketAddr), ClientError> {
        let addr = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|e| ClientError::Connect(format!("resolving {}: {e}", url.host)))?
            .next()
            .ok_or_else(|| ClientError::Connect(format!("{} has no address", url.host)))?;
        let bind = cfg.local_bind.unwrap_or(match addr {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        });
        let quic_cfg = quinn_client_config(&cfg.trust, cfg.client_cert.as_ref())?;
        let server_name = url.server_name()?.to_str().into_owned();
        let socket = std::net::UdpSocket::bind(bind)?;
        // Everything the relay sends arrives on this one socket: a default-size receive buffer
        // (~90 packets) overflows on a burst (a tunnel's download) while the endpoint task waits for
        // a CPU. A limit, not an allocation; the kernel caps it at net.core.rmem_max.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(QUIC_RECV_BUFFER);
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        endpoint.set_default_client_config(quic_cfg);

        let handshake = async {
            let connecting = endpoint
                .connect(addr, &server_name)
                .map_err(|e| ClientError::Connect(e.to_string()))?;
            let quic = connecting.await.map_err(map_quinn_error)?;
            // Keep our own clone: h3_quinn takes ownership, but datagrams go through quinn directly.
            let (mut h3conn, send_request) = h3::client::builder()
                .enable_extended_connect(true)
                .enable_datagram(true)
                .build::<_, _, Bytes>(h3_quinn::Connection::new(quic.clone()))
                .await
                .map_err(|e| ClientError::H3(e.to_string()))?;

            let dead = Arc::new(AtomicBool::new(false));
            let (settings_tx, settings_rx) = oneshot::channel();
            let driver = {
                let dead = dead.clone();
                tokio::spawn(async move {
                    let mut settings_tx = Some(settings_tx);
                    let err = futures_util::future::poll_fn(|cx| {
                        let res = h3conn.poll_close(cx);
                        // h3 stores the peer's SETTINGS when its control stream delivers them;
                        // until then `settings()` hands out an owned default.
                        if settings_tx.is_some() {
                            if let Cow::Borrowed(s) = h3conn.settings() {
                                let peer = PeerSettings {
                                    extended_connect: s.enable_extended_connect(),
                                    h3_datagram: s.enable_datagram(),
                                };
                                let _ = settings_tx.take().map(|tx| tx.send(peer));
                            }
                        }
                        res
                    })
                    .await;
                    tracing::debug!(error = %err, "relay connection ended");
                    dead.store(true, Ordering::Release);
                })
            };
            let settings = settings_rx.await.map_err(|_| {
                ClientError::H3("relay closed the connection before sending SETTINGS".into())
            })?;

            let routes = Arc::new(Routes::default());
            let dispatcher = tokio::spawn(dispatch_datagrams(quic.clone(), routes.clone()));
            Ok::<_, ClientError>(Conn {
                quic,
                send_request: Mutex::new(send_request),
                routes,
                settings,
                dead,
                tasks: vec![driver, dispatcher],
                endpoint: endpoint.clone(),
            })
        };
        match tokio::time::timeout(cfg.connect_timeout, handshake).await {
            Ok(Ok(conn)) => Ok((conn, addr)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                endpoint.close(quinn::VarInt::from_u32(0), b"handshake timeout");
                Err(ClientError::Timeout)
            }
        }
    }

    /// Sends a request and waits for the response headers.
    ///
    /// A relay that went silent is detected within about `liveness` instead of QUIC's idle
    /// timeout: our request must be acknowledged within an RTT, so a whole window without any
    /// packet from the relay means it is gone; the connection is then closed.
    async fn request(
        &self,
        req: http::Request<()>,
        liveness: Duration,
    ) -> Result<(H3Stream, http::Response<()>), OpenError> {
        let mut sender = self.send_request.lock().unwrap().clone();
        let mut stream = sender
            .send_request(req)
            .await
            .map_err(|e| OpenError::BeforeSend(stream_error(e)))?;
        let started = Instant::now();
        // Set when we give up while h3-quinn still holds the stream inside a pending read: its
        // stop_sending would panic then (h3-quinn 0.0.10), and dropping the stream stops it anyway.
        let mut read_pending = false;
        let resp = {
            let recv = stream.recv_response();
            tokio::pin!(recv);
            loop {
                let rx_before = self.quic.stats().udp_rx.datagrams;
                match tokio::time::timeout(liveness, &mut recv).await {
                    Ok(r) => break r.map_err(|e| OpenError::AfterSend(stream_error(e))),
                    Err(_) if self.quic.stats().udp_rx.datagrams == rx_before => {
                        read_pending = true;
                        self.quic
                            .close(quinn::VarInt::from_u32(0x100), b"relay unresponsive");
                        break Err(OpenError::AfterSend(ClientError::Connect(
                            "relay stopped responding".into(),
                        )));
                    }
                    Err(_) if started.elapsed() >= RESPONSE_TIMEOUT => {
                        read_pending = true;
                        break Err(OpenError::AfterSend(ClientError::Timeout));
                    }
                    Err(_) => {}
                }
            }
        };
        match resp {
            Ok(resp) => Ok((stream, resp)),
            Err(e) => {
                stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                if !read_pending {
                    stream.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
                }
                Err(e)
            }
        }
    }
}

enum OpenError {
    /// The request never left: safe to retry on a new connection.
    BeforeSend(ClientError),
    AfterSend(ClientError),
}

fn map_quinn_error(e: quinn::ConnectionError) -> ClientError {
    match &e {
        quinn::ConnectionError::TransportError(t)
            if (0x100..0x200).contains(&u64::from(t.code)) =>
        {
            // RFC 9001 §4.8: TLS alerts surface as CRYPTO_ERROR 0x100 + alert.
            ClientError::Tls(e.to_string())
        }
        quinn::ConnectionError::TimedOut => ClientError::Timeout,
        _ => ClientError::Connect(e.to_string()),
    }
}

pub(crate) fn stream_error(e: h3::error::StreamError) -> ClientError {
    match e {
        h3::error::StreamError::ConnectionError(c) => ClientError::Connect(c.to_string()),
        // GOAWAY received: the relay is draining and takes no new requests on this connection.
        h3::error::StreamError::RemoteClosing => {
            ClientError::Connect("relay is going away (GOAWAY)".into())
        }
        other => ClientError::H3(other.to_string()),
    }
}

/// Reads every QUIC datagram of the connection and hands it to its tunnel's queue.
async fn dispatch_datagrams(quic: quinn::Connection, routes: Arc<Routes>) {
    while let Ok(frame) = quic.read_datagram().await {
        let (qsid, payload) = match datagram::split_quarter_stream_id(&frame) {
            Ok(v) => v,
            Err(_) => {
                // RFC 9297 §2.1: a malformed datagram / quarter stream ID above 2^60-1 "MUST be
                // treated as an HTTP/3 connection error of type H3_DATAGRAM_ERROR".
                quic.close(quinn::VarInt::from_u32(0x33), b"malformed HTTP datagram");
                return;
            }
        };
        match datagram::split_context_id(&payload) {
            Ok((datagram::UDP_PAYLOAD_CONTEXT, data)) => routes.route(qsid, data),
            // RFC 9298 §4: datagrams with an unknown context ID are dropped; a payload too short
            // for its context ID is dropped too (RFC 9298 §5).
            _ => {
                routes.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Anything that opens tunnels: a single [`RelayClient`] or a [`crate::select::RelaySet`].
pub trait TunnelOpener: Send + Sync + 'static {
    fn connect_tcp(
        &self,
        target: &Target,
    ) -> impl Future<Output = Result<TcpTunnel, ClientError>> + Send;
    fn connect_udp(
        &self,
        target: &Target,
    ) -> impl Future<Output = Result<UdpTunnel, ClientError>> + Send;
}

struct ClientInner {
    cfg: ClientConfig,
    url: RelayUrl,
    current: tokio::sync::Mutex<Option<Arc<Conn>>>,
    remote: Mutex<SocketAddr>,
    closed: AtomicBool,
}

/// A connection to one relay, shared by all tunnels opened through it. Cheap to clone.
#[derive(Clone)]
pub struct RelayClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for RelayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayClient")
            .field("relay", &self.inner.url.authority)
            .finish_non_exhaustive()
    }
}

impl RelayClient {
    /// Connects to the relay: QUIC handshake, then waits for the relay's HTTP/3 SETTINGS (so the
    /// first extended CONNECT is allowed, RFC 9220 §3), all within `cfg.connect_timeout`.
    pub async fn connect(cfg: ClientConfig) -> Result<RelayClient, ClientError> {
        let url = RelayUrl::parse(&cfg.relay)?;
        let (conn, addr) = Conn::establish(&cfg, &url).await?;
        Ok(RelayClient {
            inner: Arc::new(ClientInner {
                cfg,
                url,
                current: tokio::sync::Mutex::new(Some(Arc::new(conn))),
                remote: Mutex::new(addr),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Whether both are handles of the same client.
    pub(crate) fn same_as(&self, other: &RelayClient) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The relay's address of the current (or last) connection.
    pub fn remote_addr(&self) -> SocketAddr {
        *self.inner.remote.lock().unwrap()
    }

    /// The relay URL's `host:port`.
    pub fn relay_authority(&self) -> &str {
        &self.inner.url.authority
    }

    /// The config this client was built from.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// Moves the current connection to `socket` (quinn `Endpoint::rebind`), as a NAT rebinding or
    /// a client migration would: packets leave from the new address and, when the relay issued
    /// spare connection IDs, carry a fresh one; open tunnels continue.
    pub async fn rebind(&self, socket: std::net::UdpSocket) -> Result<(), ClientError> {
        let current = self.inner.current.lock().await;
        let conn = current.as_ref().ok_or(ClientError::Closed)?;
        conn.endpoint.rebind(socket)?;
        Ok(())
    }

    /// Closes the connection; open tunnels end, new tunnels fail with [`ClientError::Closed`].
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Ok(mut cur) = self.inner.current.try_lock() {
            if let Some(c) = cur.take() {
                c.quic
                    .close(quinn::VarInt::from_u32(0x100), b"client closing"); // H3_NO_ERROR
            }
        } else {
            // A reconnect is in progress; it checks `closed` before installing the connection.
        }
    }

    /// Resolves once the current connection (if any) is closed, by either side.
    pub async fn closed(&self) {
        let current = self.inner.current.lock().await.clone();
        if let Some(c) = current {
            c.quic.closed().await;
        }
    }

    /// Number of received QUIC datagrams dropped on the current connection (unknown stream or
    /// context, or a full tunnel queue).
    pub async fn dropped_datagrams(&self) -> u64 {
        match &*self.inner.current.lock().await {
            Some(c) => c.routes.dropped.load(Ordering::Relaxed),
            None => 0,
        }
    }

    /// Measures the relay's round-trip time: QUIC's smoothed RTT of the live connection, or the
    /// duration of a fresh handshake if there is none.
    pub async fn rtt_probe(&self) -> Result<Duration, ClientError> {
        let started = Instant::now();
        let conn = self.conn().await?;
        let rtt = conn.quic.rtt();
        Ok(if rtt.is_zero() {
            started.elapsed()
        } else {
            rtt
        })
    }

    /// The live connection, re-established if it died.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>, ClientError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        let mut cur = self.inner.current.lock().await;
        if let Some(c) = &*cur {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        *cur = None;
        let (conn, addr) = Conn::establish(&self.inner.cfg, &self.inner.url).await?;
        if self.inner.closed.load(Ordering::Acquire) {
            conn.quic
                .close(quinn::VarInt::from_u32(0x100), b"client closing");
            return Err(ClientError::Closed);
        }
        let conn = Arc::new(conn);
        *self.inner.remote.lock().unwrap() = addr;
        *cur = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `build(conn)`'s request; if the connection turned out dead before the request left,
    /// retries once on a fresh connection.
    async fn open(
        &self,
        build: impl Fn(&Conn) -> Result<http::Request<()>, ClientError>,
    ) -> Result<(Arc<Conn>, H3Stream, http::Response<()>), ClientError> {
        let mut retried = false;
        loop {
            let conn = self.conn().await?;
            let req = build(&conn)?;
            match conn.request(req, self.inner.cfg.connect_timeout).await {
                Ok((stream, resp)) => return Ok((conn, stream, resp)),
                // A request that could not even be sent means the connection takes no new
                // requests (closed, or the relay sent GOAWAY while draining, RFC 9114 §5.2).
                // Retire it — its open tunnels keep running — and retry once on a fresh one.
                Err(OpenError::BeforeSend(e))
                    if !retried && (!conn.is_alive() || matches!(e, ClientError::Connect(_))) =>
                {
                    tracing::debug!(error = %e, "relay connection takes no new requests; reconnecting");
                    conn.retire();
                    retried = true;
                }
                Err(OpenError::BeforeSend(e) | OpenError::AfterSend(e)) => return Err(e),
            }
        }
    }

    fn authorize(&self, req: &mut http::Request<()>) -> Result<(), ClientError> {
        if let Some(token) = &self.inner.cfg.token {
            let v = http::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ClientError::InvalidUrl("token is not a valid header value".into()))?;
            req.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, v);
        }
        Ok(())
    }

    /// Opens a TCP tunnel with a classic CONNECT (RFC 9114 §4.4) and waits for the 2xx.
    ///
    /// Note: h3 0.0.8 adds `:scheme https` and `:path /` to every request, also to a classic
    /// CONNECT where RFC 9114 §4.4 says they are omitted; cfr's relay ignores them.
    pub async fn connect_tcp(&self, target: &Target) -> Result<TcpTunnel, ClientError> {
        let authority = cfr_proto::target::authority(target);
        let (conn, stream, resp) = self
            .open(|_| {
                // RFC 9114 §4.4: ":authority contains the host and port to connect to".
                let mut req = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(
                        http::Uri::builder()
                            .authority(authority.as_str())
                            .build()
                            .map_err(|e| {
                                ClientError::InvalidUrl(format!("target {authority}: {e}"))
                            })?,
                    )
                    .body(())
                    .map_err(|e| ClientError::InvalidUrl(e.to_string()))?;
                self.authorize(&mut req)?;
                Ok(req)
            })
            .await?;
        check_status(&resp)?;
        Ok(TcpTunnel::new(stream, resp, conn))
    }

    /// Opens a UDP tunnel with CONNECT-UDP (RFC 9298 §3) and waits for the 2xx.
    pub async fn connect_udp(&self, target: &Target) -> Result<UdpTunnel, ClientError> {
        let path = self.inner.cfg.connect_udp_path(target);
        let relay_authority = self.inner.url.authority.clone();
        let (qtx, qrx) = mpsc::channel(UDP_QUEUE);
        let (conn, stream, resp) = self
            .open(|conn| {
                // RFC 9220 §3: extended CONNECT only after the peer's SETTINGS_ENABLE_CONNECT_PROTOCOL=1.
                if !conn.settings.extended_connect {
                    return Err(ClientError::NotSupported(
                        "SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 9220)".into(),
                    ));
                }
                // RFC 9298 §3: :method CONNECT, :protocol connect-udp, :scheme https, :path from
                // the URI template, :authority of the proxy.
                let uri = http::Uri::builder()
                    .scheme("https")
                    .authority(relay_authority.as_str())
                    .path_and_query(path.as_str())
                    .build()
                    .map_err(|e| {
                        ClientError::InvalidUrl(format!("connect-udp path {path}: {e}"))
                    })?;
                let mut req = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(uri)
                    .extension(h3::ext::Protocol::CONNECT_UDP)
                    // RFC 9298 §3: the request "SHALL include a single Capsule-Protocol header
                    // field with a value of ?1" (RFC 9297 §3.4).
                    .header("capsule-protocol", "?1")
                    .body(())
                    .map_err(|e| ClientError::InvalidUrl(e.to_string()))?;
                self.authorize(&mut req)?;
                Ok(req)
            })
            .await?;
        check_status(&resp)?;
        let quic_datagrams = conn.quic_datagrams(self.inner.cfg.datagrams);
        Ok(UdpTunnel::new(conn, stream, resp, quic_datagrams, qtx, qrx))
    }

    /// Sends an arbitrary request (headers as given, plus the bearer token if configured and not
    /// already present) and returns whatever the relay answered, 2xx or not.
    pub async fn send_request(&self, req: http::Request<()>) -> Result<RawTunnel, ClientError> {
        let (conn, stream, response) = self
            .open(|_| {
                let mut r = req.clone();
                if !r.headers().contains_key(http::header::PROXY_AUTHORIZATION) {
                    self.authorize(&mut r)?;
                }
                Ok(r)
            })
            .await?;
        Ok(RawTunnel {
            response,
            stream,
            quic: conn.quic.clone(),
        })
    }
}

impl TunnelOpener for RelayClient {
    async fn connect_tcp(&self, target: &Target) -> Result<TcpTunnel, ClientError> {
        RelayClient::connect_tcp(self, target).await
    }
    async fn connect_udp(&self, target: &Target) -> Result<UdpTunnel, ClientError> {
        RelayClient::connect_udp(self, target).await
    }
}

/// Non-2xx → [`ClientError::Refused`] with the parsed Proxy-Status (RFC 9209).
fn check_status(resp: &http::Response<()>) -> Result<(), ClientError> {
    if resp.status().is_success() {
        return Ok(());
    }
    Err(refusal(resp))
}

/// The relay's refusal as [`ClientError::Refused`], with its Proxy-Status (RFC 9209) if any.
pub(crate) fn refusal(resp: &http::Response<()>) -> ClientError {
    let proxy_status = resp
        .headers()
        .get_all("proxy-status")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(cfr_proto::ProxyStatus::parse);
    ClientError::Refused {
        status: resp.status(),
        proxy_status,
    }
}
