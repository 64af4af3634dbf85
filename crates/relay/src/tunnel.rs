//! The tunnel core shared by every front-end: authentication verdicts, target resolution,
//! destination policy, egress binding, limits, and the byte/datagram pumps. A front-end only maps
//! its framing (HTTP/3 streams, HTTP/2 streams, an upgraded HTTP/1.1 connection) onto
//! [`TunnelRecv`] / [`TunnelSend`].
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cfr_egress::{ConnectionEgress, EgressPool};
use cfr_proto::capsule::{self, Capsule, CapsuleDecoder};
use cfr_proto::datagram::{self, MAX_UDP_PAYLOAD, UDP_PAYLOAD_CONTEXT};
use cfr_proto::{Host, ProxyError, ProxyStatus, Target};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::auth::{AuthOutcome, Authenticator};
use crate::config::RelayConfig;
use crate::metrics as m;
use crate::policy::DestinationPolicy;
use crate::resolve::{with_port, ResolveError, Resolver};

/// Name this relay uses in Proxy-Status.
pub const PROXY_NAME: &str = "cfr";

/// A refusal the client sees as an HTTP status plus Proxy-Status (RFC 9209).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelError {
    pub error: ProxyError,
    pub details: &'static str,
    /// Overrides the status `error` maps to (407 for missing credentials).
    pub status: Option<u16>,
}

impl TunnelError {
    pub fn new(error: ProxyError, details: &'static str) -> Self {
        Self {
            error,
            details,
            status: None,
        }
    }

    pub fn status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.error.status())
    }

    /// The Proxy-Status header value. Details never echo client-supplied data.
    pub fn proxy_status(&self) -> String {
        ProxyStatus {
            proxy: PROXY_NAME.to_owned(),
            error: self.error,
            details: Some(self.details.to_owned()),
        }
        .to_header_value()
    }
}

impl std::fmt::Display for TunnelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({})",
            self.status(),
            self.error.token(),
            self.details
        )
    }
}

/// Tunnel kinds, for limits, metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    Tcp,
    Udp,
}

impl TunnelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelKind::Tcp => "tcp",
            TunnelKind::Udp => "udp",
        }
    }
}

/// Everything a front-end needs to open tunnels. Shared by all connections.
pub struct Core {
    pub config: RelayConfig,
    pub auth: Authenticator,
    pub policy: DestinationPolicy,
    pub egress: EgressPool,
    resolver: Arc<dyn Resolver>,
    dns_slots: Semaphore,
    tunnel_slots: Arc<Semaphore>,
    requests: RequestCounts,
    /// This relay's own tallies of what the metrics also count.
    pub counters: RelayCounters,
}

/// Refusals and drops of one relay, readable in-process (tests, status pages) like
/// [`Core::requests_seen`]; the Prometheus metrics are process-wide.
#[derive(Debug, Default)]
pub struct RelayCounters {
    pub auth_failures: AtomicU64,
    pub policy_refusals: AtomicU64,
    /// UDP payloads dropped for any reason (full queues, unknown context IDs, send errors).
    pub datagram_drops: AtomicU64,
}

impl RelayCounters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl Core {
    /// Counts one dropped UDP payload, in the metrics (by reason) and in [`RelayCounters`].
    pub fn datagram_dropped(&self, reason: &'static str) {
        metrics::counter!(m::DROPS, "reason" => reason).increment(1);
        self.counters.datagram_drops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Requests per front-end protocol: the numbers behind `cfr_requests_total`, readable in-process
/// (tests, status pages) without installing the process-global metrics recorder.
#[derive(Debug, Default)]
struct RequestCounts([AtomicU64; 3]);

impl RequestCounts {
    const PROTOCOLS: [&'static str; 3] = ["h3", "h2", "http/1.1"];

    fn slot(&self, protocol: &str) -> Option<&AtomicU64> {
        let i = Self::PROTOCOLS.iter().position(|p| *p == protocol)?;
        Some(&self.0[i])
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// Per client connection state: its egress policy state and its tunnel budget.
#[derive(Debug)]
pub struct ClientConn {
    pub egress: ConnectionEgress,
    tunnel_slots: Arc<Semaphore>,
    /// The TLS layer verified a client certificate (mTLS).
    pub client_cert_verified: bool,
}

/// Proof that a tunnel fits the limits; released when the tunnel ends.
#[derive(Debug)]
pub struct TunnelPermit {
    _total: OwnedSemaphorePermit,
    _conn: OwnedSemaphorePermit,
}

impl Core {
    pub fn new(
        config: RelayConfig,
        auth: Authenticator,
        policy: DestinationPolicy,
        egress: EgressPool,
        resolver: Arc<dyn Resolver>,
    ) -> Self {
        let dns = config.limits.dns_concurrency as usize;
        let total = config.limits.total_tunnels as usize;
        Self {
            config,
            auth,
            policy,
            egress,
            resolver,
            dns_slots: Semaphore::new(dns),
            tunnel_slots: Arc::new(Semaphore::new(total)),
            requests: RequestCounts::default(),
            counters: RelayCounters::default(),
        }
    }

    /// Tunnel requests this relay received over a front-end protocol (`h3`, `h2`, `http/1.1`).
    pub fn requests_seen(&self, protocol: &str) -> u64 {
        self.requests
            .slot(protocol)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// State for a new client connection.
    pub fn client_conn(&self, client_cert_verified: bool) -> ClientConn {
        ClientConn {
            egress: self.egress.connection(),
            tunnel_slots: Arc::new(Semaphore::new(
                self.config.limits.tunnels_per_connection as usize,
            )),
            client_cert_verified,
        }
    }

    /// Authentication first: nothing else happens for an unauthenticated request.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        conn: &ClientConn,
    ) -> Result<(), TunnelError> {
        match self.auth.check(headers, conn.client_cert_verified) {
            AuthOutcome::Allowed => Ok(()),
            outcome => {
                metrics::counter!(m::AUTH_FAILURES).increment(1);
                self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                Err(TunnelError {
                    error: ProxyError::HttpRequestDenied,
                    details: if outcome == AuthOutcome::Missing {
                        "proxy authentication required"
                    } else {
                        "invalid credentials"
                    },
                    status: Some(407),
                })
            }
        }
    }

    /// Reserves a tunnel slot on the connection and relay-wide (RFC 9209 connection_limit_reached).
    pub fn admit(&self, conn: &ClientConn) -> Result<TunnelPermit, TunnelError> {
        let conn_permit = conn.tunnel_slots.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!(m::DROPS, "reason" => "tunnels_per_connection").increment(1);
            TunnelError::new(
                ProxyError::ConnectionLimitReached,
                "too many tunnels on this connection",
            )
        })?;
        let total = self.tunnel_slots.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!(m::DROPS, "reason" => "total_tunnels").increment(1);
            TunnelError::new(
                ProxyError::ConnectionLimitReached,
                "relay tunnel capacity reached",
            )
        })?;
        Ok(TunnelPermit {
            _total: total,
            _conn: conn_permit,
        })
    }

    /// Resolves a target and keeps the addresses policy allows, in dial order.
    pub async fn resolve_allowed(&self, target: &Target) -> Result<Vec<SocketAddr>, TunnelError> {
        let addrs = match &target.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            Host::Name(name) => {
                // Waiting for a lookup slot counts against the DNS timeout, so a burst of names
                // that never resolve costs every queued request at most `dns_secs`, not a multiple.
                let lookup = async {
                    let _slot = self
                        .dns_slots
                        .acquire()
                        .await
                        .map_err(|_| ResolveError::Failed)?;
                    self.resolver.resolve(name).await
                };
                let timeout = Duration::from_secs(self.config.timeouts.dns_secs);
                match tokio::time::timeout(timeout, lookup).await {
                    Err(_) => {
                        return Err(TunnelError::new(
                            ProxyError::DnsTimeout,
                            "DNS lookup timed out",
                        ))
                    }
                    Ok(Err(ResolveError::NotFound)) => {
                        return Err(TunnelError::new(
                            ProxyError::DnsError,
                            "name does not resolve",
                        ))
                    }
                    Ok(Err(ResolveError::Failed)) => {
                        return Err(TunnelError::new(ProxyError::DnsError, "DNS lookup failed"))
                    }
                    Ok(Ok(ips)) => with_port(&ips, target.port),
                }
            }
        };
        let mut allowed = Vec::with_capacity(addrs.len());
        let mut refusal = None;
        for a in addrs {
            match self.policy.check(a) {
                Ok(()) => allowed.push(a),
                Err(r) => refusal = Some(r),
            }
        }
        if allowed.is_empty() {
            metrics::counter!(m::POLICY_REFUSALS).increment(1);
            self.counters
                .policy_refusals
                .fetch_add(1, Ordering::Relaxed);
            let details = refusal
                .map(|r| r.details())
                .unwrap_or("destination not allowed");
            return Err(TunnelError::new(
                ProxyError::DestinationIpProhibited,
                details,
            ));
        }
        self.egress.sort_by_preference(&mut allowed);
        Ok(allowed)
    }

    /// Opens the TCP connection of a CONNECT tunnel: resolve, check, bind egress, connect.
    pub async fn open_tcp(
        &self,
        conn: &ClientConn,
        target: &Target,
    ) -> Result<TcpStream, TunnelError> {
        let timeout = Duration::from_secs(self.config.timeouts.connect_secs);
        self.dial(conn, target, |source, dest| async move {
            match tokio::time::timeout(timeout, cfr_egress::connect_tcp(source, dest)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    Ok(stream)
                }
                Ok(Err(e)) => Err(connect_error(&e)),
                Err(_) => Err(TunnelError::new(
                    ProxyError::ConnectionTimeout,
                    "connect timed out",
                )),
            }
        })
        .await
    }

    /// Opens the UDP socket of a CONNECT-UDP tunnel, bound to its egress address and connected to
    /// the target (RFC 9298 §5: a connected socket lets the kernel drop packets from other peers).
    pub async fn open_udp(
        &self,
        conn: &ClientConn,
        target: &Target,
    ) -> Result<UdpSocket, TunnelError> {
        self.dial(conn, target, |source, dest| async move {
            cfr_egress::bind_udp(source, dest).map_err(|e| connect_error(&e))
        })
        .await
    }

    /// Tries each allowed address of `target` in preference order, from the egress address the
    /// connection's policy picks for its family; the first success wins, else the last error.
    async fn dial<T, F, Fut>(
        &self,
        conn: &ClientConn,
        target: &Target,
        open: F,
    ) -> Result<T, TunnelError>
    where
        F: Fn(Option<IpAddr>, SocketAddr) -> Fut,
        Fut: Future<Output = Result<T, TunnelError>>,
    {
        let addrs = self.resolve_allowed(target).await?;
        let mut last = TunnelError::new(
            ProxyError::DestinationUnavailable,
            "no address to connect to",
        );
        for dest in addrs {
            // The source is fixed here, once, for the tunnel's whole life.
            let source = match conn.egress.source_for(dest.ip()) {
                Ok(s) => s,
                Err(_) => {
                    last = TunnelError::new(
                        ProxyError::DestinationIpUnroutable,
                        "no egress address for this address family",
                    );
                    continue;
                }
            };
            match open(source, dest).await {
                Ok(t) => return Ok(t),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn connect_error(e: &io::Error) -> TunnelError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            TunnelError::new(ProxyError::ConnectionRefused, "connection refused")
        }
        io::ErrorKind::TimedOut => {
            TunnelError::new(ProxyError::ConnectionTimeout, "connect timed out")
        }
        _ => match e.raw_os_error() {
            // ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL (egress address not routable here)
            Some(101) | Some(113) | Some(99) => TunnelError::new(
                ProxyError::DestinationIpUnroutable,
                "destination unreachable",
            ),
            _ => TunnelError::new(ProxyError::DestinationUnavailable, "connect failed"),
        },
    }
}

/// How a front-end aborts a client-side stream. Each front-end maps these onto its own codes
/// (HTTP/3: `http3::abort_code`; HTTP/2: `http2::abort_reason`; HTTP/1.1 can only close the
/// connection abruptly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// The destination reset the TCP connection (RFC 9114 §4.4: H3_CONNECT_ERROR; RFC 9113 §8.5:
    /// CONNECT_ERROR).
    ConnectError,
    /// The client sent a malformed capsule stream (RFC 9297 §3.3: H3_DATAGRAM_ERROR on HTTP/3).
    DatagramError,
    /// The relay gave up on the tunnel (idle timeout, shutdown).
    Cancelled,
}

/// Bytes from the client, as a front-end delivers them.
pub trait TunnelRecv: Send {
    /// Next chunk; `Ok(None)` at a clean end of stream (FIN); `Err` if the client reset the stream.
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// Tells the client to stop sending (e.g. STOP_SENDING).
    fn abort(&mut self, why: Abort);
}

/// Bytes to the client.
pub trait TunnelSend: Send {
    fn send(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Clean end of stream (FIN).
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Abrupt end of stream (RESET_STREAM / RST_STREAM).
    fn reset(&mut self, why: Abort);
}

/// QUIC DATAGRAM frames towards the client, when the front-end has them (HTTP/3 only).
pub trait DatagramOut: Send + Sync {
    /// Largest HTTP datagram payload (context ID + data) that fits a frame now, if any.
    fn max_payload(&self) -> Option<usize>;
    /// Sends one HTTP datagram (context ID + data) in one QUIC DATAGRAM frame, built with a
    /// single allocation; never blocks. False if it was dropped.
    fn send(&self, context_id: u64, data: &[u8]) -> bool;
}

/// What a finished tunnel did, for its log line.
#[derive(Debug, Default)]
pub struct TunnelStats {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub datagrams_up: u64,
    pub datagrams_down: u64,
    pub outcome: &'static str,
}

/// Tracks the last time a tunnel moved data, for idle timeouts.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// Resolves once nothing moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let since = self.start.elapsed().saturating_sub(last);
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since + Duration::from_millis(5)).await;
        }
    }
}

/// Why a pump direction stopped early.
enum Stop {
    ClientReset,
    TargetReset,
    Malformed,
    Idle,
}

/// Moves a TCP byte stream both ways until both directions have ended.
///
/// RFC 9114 §4.4: FIN from the client becomes a TCP FIN (half-close) and vice versa; a TCP reset or
/// error from the destination resets the client stream with H3_CONNECT_ERROR; a client reset
/// aborts the TCP connection (RST).
pub async fn relay_tcp<R: TunnelRecv, S: TunnelSend>(
    core: &Core,
    mut tcp: TcpStream,
    mut rx: R,
    mut tx: S,
) -> TunnelStats {
    let activity = Activity::new();
    let idle = Duration::from_secs(core.config.timeouts.tcp_idle_secs);
    let buf_size = core.config.limits.tcp_buffer_bytes;
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let (tcp_r, mut tcp_w) = tcp.split();

    let up = async {
        // A front-end hands over chunks as its transport delivered them: for HTTP/3 about one QUIC
        // packet each. One write syscall per packet costs more than the crypto, so chunks that are
        // already there are coalesced and written when the next one would have to be waited for.
        let mut out = tokio::io::BufWriter::with_capacity(buf_size, &mut tcp_w);
        loop {
            let next = rx.recv();
            tokio::pin!(next);
            let received = match futures_util::FutureExt::now_or_never(next.as_mut()) {
                Some(r) => r,
                None => {
                    if !out.buffer().is_empty() && out.flush().await.is_err() {
                        return Err(Stop::TargetReset);
                    }
                    next.await
                }
            };
            match received {
                Ok(Some(chunk)) => {
                    activity.touch();
                    up_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if out.write_all(&chunk).await.is_err() {
                        return Err(Stop::TargetReset);
                    }
                }
                Ok(None) => {
                    // Half-close: the destination sees FIN (after what is buffered), the other
                    // direction keeps going.
                    let _ = out.shutdown().await;
                    return Ok(());
                }
                Err(_) => return Err(Stop::ClientReset),
            }
        }
    };
    let down = async {
        // Read straight into the buffer that is sent on (no copy), allocated only once the
        // destination has sent something: an idle tunnel holds no buffer.
        let mut buf = BytesMut::new();
        loop {
            if tcp_r.as_ref().readable().await.is_err() {
                return Err(Stop::TargetReset);
            }
            if buf.capacity() < buf_size / 4 {
                buf = BytesMut::with_capacity(buf_size);
            }
            match tcp_r.as_ref().try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = tx.finish().await;
                    return Ok(());
                }
                Ok(n) => {
                    activity.touch();
                    down_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if tx.send(buf.split().freeze()).await.is_err() {
                        return Err(Stop::ClientReset);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(Stop::TargetReset),
            }
        }
    };
    let idle_timer = async {
        activity.idle(idle).await;
        Err::<(), Stop>(Stop::Idle)
    };

    let result = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        r = idle_timer => r,
    };
    let outcome = match result {
        Ok(()) => "closed",
        Err(Stop::ClientReset) => {
            // Client reset: abort the TCP connection with RST (linger 0) rather than FIN.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            tx.reset(Abort::Cancelled);
            rx.abort(Abort::Cancelled);
            "client_reset"
        }
        Err(Stop::TargetReset) => {
            tx.reset(Abort::ConnectError);
            rx.abort(Abort::ConnectError);
            "target_reset"
        }
        Err(Stop::Idle) => {
            tx.reset(Abort::Cancelled);
            rx.abort(Abort::Cancelled);
            "idle_timeout"
        }
        Err(Stop::Malformed) => "malformed",
    };
    drop(tcp);
    let stats = TunnelStats {
        bytes_up: up_bytes.into_inner(),
        bytes_down: down_bytes.into_inner(),
        outcome,
        ..Default::default()
    };
    metrics::counter!(m::BYTES, "kind" => "tcp", "direction" => "up").increment(stats.bytes_up);
    metrics::counter!(m::BYTES, "kind" => "tcp", "direction" => "down").increment(stats.bytes_down);
    stats
}

/// Inputs of a UDP tunnel besides the socket and the request stream.
pub struct UdpChannels {
    /// HTTP datagram payloads (context ID + data) that arrived as QUIC DATAGRAM frames.
    pub datagrams_in: Option<mpsc::Receiver<Bytes>>,
    /// QUIC DATAGRAM output, if the client negotiated it (RFC 9297 §2.1.1).
    pub datagrams_out: Option<Box<dyn DatagramOut>>,
}

/// Moves UDP payloads between the client (QUIC datagrams and/or DATAGRAM capsules) and the
/// connected UDP socket until the request stream ends or the tunnel idles out.
pub async fn relay_udp<R: TunnelRecv, S: TunnelSend>(
    core: &Core,
    sock: UdpSocket,
    mut rx: R,
    mut tx: S,
    channels: UdpChannels,
) -> TunnelStats {
    let activity = Activity::new();
    let idle = Duration::from_secs(core.config.timeouts.udp_idle_secs);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let bytes_up = AtomicU64::new(0);
    let bytes_down = AtomicU64::new(0);
    // Set once the client sends a capsule: from then on answer with capsules too, whatever was
    // negotiated (RFC 9297 §3.5 lets either encoding be used; curl only understands capsules).
    let client_uses_capsules = std::sync::atomic::AtomicBool::new(channels.datagrams_out.is_none());
    let (cap_tx, mut cap_rx) = mpsc::channel::<Bytes>(core.config.limits.datagram_queue);
    let UdpChannels {
        datagrams_in,
        datagrams_out,
    } = channels;

    let forward = |data: &[u8]| {
        activity.touch();
        match sock.try_send(data) {
            Ok(_) => {
                up.fetch_add(1, Ordering::Relaxed);
                bytes_up.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            // RFC 9298 §5: never fragment; a payload the path cannot carry (EMSGSIZE) is dropped,
            // as is one the socket buffer has no room for right now.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                core.datagram_dropped("udp_send_buffer_full")
            }
            Err(_) => core.datagram_dropped("udp_send_error"),
        }
    };

    // Client → destination, capsules on the request stream.
    let from_stream = async {
        let mut decoder = CapsuleDecoder::new(MAX_UDP_PAYLOAD + 8);
        loop {
            match rx.recv().await {
                Ok(Some(chunk)) => {
                    decoder.push(&chunk);
                    loop {
                        match decoder.next_capsule() {
                            Ok(Some(Capsule::Datagram { context_id, data })) => {
                                client_uses_capsules.store(true, Ordering::Relaxed);
                                if context_id == UDP_PAYLOAD_CONTEXT {
                                    forward(&data);
                                } else {
                                    // RFC 9298 §4: unknown context IDs are dropped, not errors.
                                    core.datagram_dropped("unknown_context_id");
                                }
                            }
                            // RFC 9297 §3.2: unknown capsule types are skipped.
                            Ok(Some(Capsule::Unknown { .. })) => {}
                            Ok(None) => break,
                            Err(_) => return Err(Stop::Malformed),
                        }
                    }
                }
                Ok(None) => {
                    // RFC 9297 §3.3: a truncated capsule at the end of the stream is an error.
                    return if decoder.finish().is_ok() {
                        Ok(())
                    } else {
                        Err(Stop::Malformed)
                    };
                }
                Err(_) => return Err(Stop::ClientReset),
            }
        }
    };

    // Client → destination, QUIC DATAGRAM frames (already stripped of the quarter stream ID).
    // Datagrams that queued up while this task was not running go out together: runs of equal
    // size as one UDP_SEGMENT (GSO) sendmsg, which crosses the IP stack once instead of per
    // datagram; everything else (and any GSO failure) one send per datagram as before.
    let from_datagrams = async {
        let Some(mut dg) = datagrams_in else {
            return std::future::pending::<Result<(), Stop>>().await;
        };
        let mut gso = true;
        let mut batch: Vec<Bytes> = Vec::with_capacity(GSO_MAX_SEGMENTS);
        while let Some(first) = dg.recv().await {
            batch.clear();
            for payload in std::iter::once(first)
                .chain(std::iter::from_fn(|| dg.try_recv().ok()))
                .take(GSO_MAX_SEGMENTS)
            {
                match datagram::split_context_id(&payload) {
                    Ok((UDP_PAYLOAD_CONTEXT, data)) => batch.push(data),
                    Ok(_) => core.datagram_dropped("unknown_context_id"),
                    Err(_) => core.datagram_dropped("malformed_datagram"),
                }
            }
            let mut rest = &batch[..];
            while let Some(first) = rest.first() {
                let size = first.len();
                let run = rest
                    .iter()
                    .take_while(|d| d.len() == size)
                    .take((GSO_MAX_BYTES / size.max(1)).max(1))
                    .count();
                let (group, tail) = rest.split_at(run);
                rest = tail;
                if gso && run > 1 && size > 0 {
                    match send_segments(&sock, group, size) {
                        Ok(()) => {
                            activity.touch();
                            up.fetch_add(run as u64, Ordering::Relaxed);
                            bytes_up.fetch_add((run * size) as u64, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            activity.touch();
                            for _ in 0..run {
                                core.datagram_dropped("udp_send_buffer_full");
                            }
                            continue;
                        }
                        // No GSO on this path (EIO, EINVAL) or a payload the path cannot carry
                        // (EMSGSIZE): one send per datagram from now on, with its own outcome.
                        Err(_) => gso = false,
                    }
                }
                for d in group {
                    forward(d);
                }
            }
        }
        std::future::pending::<Result<(), Stop>>().await
    };

    // Destination → client.
    let from_socket = async {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match sock.recv(&mut buf).await {
                Ok(n) => n,
                // ICMP errors on a connected socket (port unreachable) surface here; keep going.
                Err(_) => {
                    core.datagram_dropped("udp_recv_error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            activity.touch();
            down.fetch_add(1, Ordering::Relaxed);
            bytes_down.fetch_add(n as u64, Ordering::Relaxed);
            let data = &buf[..n];
            let via_quic = !client_uses_capsules.load(Ordering::Relaxed);
            if via_quic {
                if let Some(out) = &datagrams_out {
                    let payload_len = cfr_proto::varint::encoded_len(UDP_PAYLOAD_CONTEXT) + n;
                    if out.max_payload().is_some_and(|max| payload_len <= max) {
                        if !out.send(UDP_PAYLOAD_CONTEXT, data) {
                            core.datagram_dropped("quic_datagram_send");
                        }
                        continue;
                    }
                    // Too large for a DATAGRAM frame: carry it in a capsule rather than lose it.
                }
            }
            let mut c = Vec::with_capacity(n + 8);
            capsule::encode_datagram(UDP_PAYLOAD_CONTEXT, data, &mut c);
            // Never block the socket on a slow client: drop when the capsule queue is full.
            if cap_tx.try_send(Bytes::from(c)).is_err() {
                core.datagram_dropped("capsule_queue_full");
            }
        }
    };

    // Capsules → client stream.
    let to_stream = async {
        while let Some(c) = cap_rx.recv().await {
            if tx.send(c).await.is_err() {
                return Err(Stop::ClientReset);
            }
        }
        Ok(())
    };

    let idle_timer = async {
        activity.idle(idle).await;
        Err::<(), Stop>(Stop::Idle)
    };

    let result: Result<(), Stop> = tokio::select! {
        r = from_stream => r,
        r = from_datagrams => r,
        _ = from_socket => Ok(()),
        r = to_stream => r,
        r = idle_timer => r,
    };
    let outcome = match result {
        Ok(()) => {
            let _ = tx.finish().await;
            "closed"
        }
        Err(Stop::Malformed) => {
            tx.reset(Abort::DatagramError);
            rx.abort(Abort::DatagramError);
            "malformed_capsule"
        }
        Err(Stop::ClientReset) => {
            tx.reset(Abort::Cancelled);
            "client_reset"
        }
        Err(Stop::TargetReset) => {
            tx.reset(Abort::ConnectError);
            "target_error"
        }
        Err(Stop::Idle) => {
            tx.reset(Abort::Cancelled);
            rx.abort(Abort::Cancelled);
            "idle_timeout"
        }
    };
    let stats = TunnelStats {
        datagrams_up: up.into_inner(),
        datagrams_down: down.into_inner(),
        bytes_up: bytes_up.into_inner(),
        bytes_down: bytes_down.into_inner(),
        outcome,
    };
    metrics::counter!(m::DATAGRAMS, "direction" => "up").increment(stats.datagrams_up);
    metrics::counter!(m::DATAGRAMS, "direction" => "down").increment(stats.datagrams_down);
    metrics::counter!(m::BYTES, "kind" => "udp", "direction" => "up").increment(stats.bytes_up);
    metrics::counter!(m::BYTES, "kind" => "udp", "direction" => "down").increment(stats.bytes_down);
    stats
}

/// At most this many client datagrams go out in one UDP_SEGMENT sendmsg (the kernel's limit is 64
/// on older Linux, 128 since 5.x).
const GSO_MAX_SEGMENTS: usize = 64;
/// And at most this many bytes (one UDP datagram's worth of payload before segmentation).
const GSO_MAX_BYTES: usize = 60_000;

/// Sends `group` (all `size` bytes long, `size > 0`) to the connected socket's peer as separate
/// UDP datagrams with one sendmsg: UDP_SEGMENT (Linux GSO) cuts the concatenated payload every
/// `size` bytes. Each datagram keeps its own boundaries, DF and Not-ECT as with `send`.
fn send_segments(sock: &UdpSocket, group: &[Bytes], size: usize) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let segment = u16::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let iov: Vec<io::IoSlice<'_>> = group.iter().map(|d| io::IoSlice::new(d)).collect();
    sock.try_io(tokio::io::Interest::WRITABLE, || {
        sendmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &iov,
            &[ControlMessage::UdpGsoSegments(&segment)],
            MsgFlags::empty(),
            None,
        )
        .map(|_| ())
        .map_err(io::Error::from)
    })
}

/// A random identifier for one tunnel's log lines. It links nothing: connection-level log lines
/// never carry it.
pub fn tunnel_id() -> String {
    let mut b = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    hex::encode(b)
}

/// Helper for logs: never includes client or egress addresses.
pub fn log_tunnel_end(
    id: &str,
    kind: TunnelKind,
    target: &Target,
    status: u16,
    stats: &TunnelStats,
    started: Instant,
) {
    tracing::info!(
        tunnel = id,
        kind = kind.as_str(),
        destination = %target,
        status,
        outcome = stats.outcome,
        bytes_up = stats.bytes_up,
        bytes_down = stats.bytes_down,
        datagrams_up = stats.datagrams_up,
        datagrams_down = stats.datagrams_down,
        duration_ms = started.elapsed().as_millis() as u64,
        "tunnel closed"
    );
}

/// Helper for logs of refused tunnels.
pub fn log_tunnel_refused(id: &str, kind: TunnelKind, target: Option<&Target>, err: &TunnelError) {
    match target {
        Some(t) => {
            tracing::info!(tunnel = id, kind = kind.as_str(), destination = %t, status = err.status(), error = err.error.token(), "tunnel refused")
        }
        None => tracing::info!(
            tunnel = id,
            kind = kind.as_str(),
            status = err.status(),
            error = err.error.token(),
            "tunnel refused"
        ),
    }
}

/// One front-end request/response exchange, abstracted over HTTP/3, HTTP/2 and HTTP/1.1.
pub trait Exchange: Send {
    type Recv: TunnelRecv;
    type Send: TunnelSend;
    /// Sends the response head. For a 2xx it returns the tunnel's halves; otherwise it ends the
    /// exchange (stopping the request body) and returns `None`.
    fn respond(
        self,
        response: http::Response<()>,
    ) -> impl Future<Output = io::Result<Option<(Self::Recv, Self::Send)>>> + Send;
    /// QUIC datagram plumbing for a UDP tunnel (HTTP/3 only); `None`s elsewhere.
    fn udp_channels(&mut self) -> UdpChannels;
    /// Front-end name for metrics (`h3`, `h2`, `http/1.1`).
    fn protocol(&self) -> &'static str;
}

/// What the client asked for, once the request head is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    pub kind: TunnelKind,
    pub target: Target,
}

/// Validates a request head: method, `:protocol`, target syntax.
///
/// RFC 9114 §4.4 / RFC 9113 §8.5: classic CONNECT names the target in `:authority`.
/// RFC 9298 §3: connect-udp uses extended CONNECT (`:protocol connect-udp`) and the URI template.
pub fn classify(
    method: &http::Method,
    protocol: Option<&str>,
    uri: &http::Uri,
) -> Result<TunnelRequest, TunnelError> {
    if method != http::Method::CONNECT {
        return Err(TunnelError {
            status: Some(405),
            ..TunnelError::new(ProxyError::HttpRequestError, "only CONNECT is supported")
        });
    }
    match protocol {
        None => {
            let authority = uri.authority().ok_or_else(|| {
                TunnelError::new(ProxyError::HttpRequestError, "CONNECT without :authority")
            })?;
            let target = cfr_proto::target::parse_authority(authority.as_str()).map_err(|_| {
                TunnelError::new(ProxyError::HttpRequestError, "malformed CONNECT authority")
            })?;
            Ok(TunnelRequest {
                kind: TunnelKind::Tcp,
                target,
            })
        }
        Some(p) if p.eq_ignore_ascii_case("connect-udp") => {
            let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
            let target = cfr_proto::target::parse_connect_udp_path(path).map_err(|e| {
                TunnelError::new(
                    ProxyError::HttpRequestError,
                    match e {
                        cfr_proto::TargetError::ZoneId => "IPv6 zone identifiers are not allowed",
                        cfr_proto::TargetError::BadPort => "malformed target_port",
                        cfr_proto::TargetError::BadHost => "malformed target_host",
                        _ => "path does not match the connect-udp URI template",
                    },
                )
            })?;
            Ok(TunnelRequest {
                kind: TunnelKind::Udp,
                target,
            })
        }
        // RFC 9220 / RFC 8441: an extended CONNECT protocol we do not implement.
        Some(_) => Err(TunnelError {
            status: Some(501),
            ..TunnelError::new(ProxyError::HttpRequestError, "unsupported :protocol")
        }),
    }
}

/// Builds the response for a refused tunnel.
pub fn error_response(err: &TunnelError) -> http::Response<()> {
    let mut b = http::Response::builder()
        .status(err.status())
        .header("proxy-status", err.proxy_status());
    if err.status() == 407 {
        b = b.header(http::header::PROXY_AUTHENTICATE, "Bearer realm=\"cfr\"");
    }
    if err.status() == 405 {
        b = b.header(http::header::ALLOW, "CONNECT");
    }
    b.body(()).expect("static response parts")
}

/// The whole life of one tunnel request on any front-end: authenticate (before any DNS lookup or
/// dial), validate, admit against limits, open the destination side, answer, relay, log.
pub async fn serve_request<E: Exchange>(
    core: &Core,
    conn: &ClientConn,
    head: &http::request::Parts,
    protocol: Option<&str>,
    mut exchange: E,
) {
    let started = Instant::now();
    let id = tunnel_id();
    metrics::counter!(m::REQUESTS, "protocol" => exchange.protocol()).increment(1);
    if let Some(c) = core.requests.slot(exchange.protocol()) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    let request = core
        .authenticate(&head.headers, conn)
        .and_then(|()| classify(&head.method, protocol, &head.uri));
    let request = match request {
        Ok(r) => r,
        Err(err) => {
            let kind = if protocol.is_some() {
                TunnelKind::Udp
            } else {
                TunnelKind::Tcp
            };
            refuse(id, kind, None, err, exchange).await;
            return;
        }
    };
    let permit = match core.admit(conn) {
        Ok(p) => p,
        Err(err) => return refuse(id, request.kind, Some(&request.target), err, exchange).await,
    };
    let kind = request.kind;
    let target = request.target;
    match kind {
        TunnelKind::Tcp => {
            let tcp = match core.open_tcp(conn, &target).await {
                Ok(t) => t,
                Err(err) => return refuse(id, kind, Some(&target), err, exchange).await,
            };
            let Some((rx, tx)) = open_response(exchange, kind, false).await else {
                return;
            };
            let _active = ActiveTunnel::new(kind);
            let stats = relay_tcp(core, tcp, rx, tx).await;
            log_tunnel_end(&id, kind, &target, 200, &stats, started);
        }
        TunnelKind::Udp => {
            let sock = match core.open_udp(conn, &target).await {
                Ok(s) => s,
                Err(err) => return refuse(id, kind, Some(&target), err, exchange).await,
            };
            let channels = exchange.udp_channels();
            let Some((rx, tx)) = open_response(exchange, kind, true).await else {
                return;
            };
            let _active = ActiveTunnel::new(kind);
            let stats = relay_udp(core, sock, rx, tx, channels).await;
            log_tunnel_end(&id, kind, &target, 200, &stats, started);
        }
    }
    drop(permit);
}

async fn open_response<E: Exchange>(
    exchange: E,
    kind: TunnelKind,
    capsules: bool,
) -> Option<(E::Recv, E::Send)> {
    let mut b = http::Response::builder().status(200);
    if capsules {
        // RFC 9298 §3.3 / RFC 9297 §3.4: the 2xx response carries `Capsule-Protocol: ?1`.
        b = b.header("capsule-protocol", "?1");
    }
    metrics::counter!(m::TUNNELS, "kind" => kind.as_str(), "outcome" => "ok").increment(1);
    exchange
        .respond(b.body(()).expect("static response"))
        .await
        .ok()
        .flatten()
}

async fn refuse<E: Exchange>(
    id: String,
    kind: TunnelKind,
    target: Option<&Target>,
    err: TunnelError,
    exchange: E,
) {
    metrics::counter!(m::TUNNELS, "kind" => kind.as_str(), "outcome" => err.error.token())
        .increment(1);
    log_tunnel_refused(&id, kind, target, &err);
    let _ = exchange.respond(error_response(&err)).await;
}

/// Keeps the active-tunnel gauge right whichever way a tunnel ends.
struct ActiveTunnel(TunnelKind);

impl ActiveTunnel {
    fn new(kind: TunnelKind) -> Self {
        metrics::gauge!(m::TUNNELS_ACTIVE, "kind" => kind.as_str()).increment(1.0);
        Self(kind)
    }
}

impl Drop for ActiveTunnel {
    fn drop(&mut self) {
        metrics::gauge!(m::TUNNELS_ACTIVE, "kind" => self.0.as_str()).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gso_batch_arrives_as_separate_datagrams() {
        let dest = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(dest.local_addr().unwrap()).await.unwrap();
        sock.writable().await.unwrap();
        let group: Vec<Bytes> = (0u8..5).map(|i| Bytes::from(vec![i; 1200])).collect();
        match send_segments(&sock, &group, 1200) {
            Ok(()) => {}
            // No UDP GSO here: the relay falls back to one send per datagram.
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => return,
            Err(e) => panic!("GSO send failed: {e}"),
        }
        let mut buf = [0u8; 4096];
        for i in 0u8..5 {
            let n = dest.recv(&mut buf).unwrap();
            assert_eq!(n, 1200, "datagram {i} must keep its own boundary");
            assert!(
                buf[..n].iter().all(|&b| b == i),
                "datagram {i} out of order or mixed"
            );
        }
    }
}
