//! What every tunnel request shares: authentication verdicts, limits, target resolution,
//! destination policy and egress binding.
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cfr_egress::{ConnectionEgress, EgressPool, Subscriber};
use cfr_proto::{Host, ProxyError, Target};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{connect_error, TunnelError};
use super::setup_phases::{SetupClock, SetupPhase, SetupPhases};
use crate::auth::{AuthOutcome, Authenticator};
use crate::config::RelayConfig;
use crate::metrics as m;
use crate::policy::DestinationPolicy;
use crate::resolve::{with_port, ResolveError, Resolver};

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
    /// `connect_udp_template`, parsed: CONNECT-UDP is accepted only at this template.
    pub udp_template: cfr_proto::UdpTemplate,
    /// The PvD served at `/.well-known/pvd`, if `pvd.identifier` is set.
    pub pvd: Option<crate::pvd::PvdPublisher>,
    /// The drain's grace period is over: every open tunnel is aborted (outcome `drained`).
    pub grace_over: tokio_util::sync::CancellationToken,
    /// Where tunnel setup time goes, summed over all tunnels (no per-client data).
    pub setup: SetupPhases,
}

/// Refusals and drops of one relay, readable in-process (tests, status pages) like
/// [`Core::requests_seen`]; the Prometheus metrics are process-wide.
#[derive(Debug, Default)]
pub struct RelayCounters {
    pub auth_failures: AtomicU64,
    pub policy_refusals: AtomicU64,
    /// UDP payloads dropped for any reason (full queues, unknown context IDs, send errors).
    pub datagram_drops: AtomicU64,
    /// QUIC Initials answered with a Retry (address validation under load).
    pub quic_retries: AtomicU64,
    /// Client connections closed for holding no tunnel for `timeouts.connection_idle_secs`.
    pub idle_connections_closed: AtomicU64,
    /// Tunnels aborted at the end of the drain's grace period.
    pub tunnels_drained: AtomicU64,
}

impl RelayCounters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl Core {
    /// Tallies how a tunnel ended where [`RelayCounters`] keeps it.
    pub(super) fn tunnel_ended(&self, stats: &super::pump::TunnelStats) {
        if stats.outcome == super::pump::TunnelOutcome::Drained {
            self.counters
                .tunnels_drained
                .fetch_add(1, Ordering::Relaxed);
        }
    }

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
    /// The subscriber that certificate stands for (`auth.subscribers.client_certs`).
    client_cert: Option<Subscriber>,
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
        let udp_template = config
            .udp_template()
            .unwrap_or_else(|_| cfr_proto::UdpTemplate::well_known());
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
            udp_template,
            pvd: None,
            grace_over: tokio_util::sync::CancellationToken::new(),
            setup: SetupPhases::default(),
        }
    }

    /// Tunnel requests this relay received over a front-end protocol (`h3`, `h2`, `http/1.1`).
    pub fn requests_seen(&self, protocol: &str) -> u64 {
        self.requests
            .slot(protocol)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one tunnel request received over `protocol`, in the metrics and in-process.
    pub(super) fn request_seen(&self, protocol: &'static str) {
        metrics::counter!(m::REQUESTS, "protocol" => protocol).increment(1);
        if let Some(c) = self.requests.slot(protocol) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// State for a new client connection. `client_cert`: the leaf (DER) of the client certificate
    /// the TLS layer verified, if any.
    pub fn client_conn(&self, client_cert: Option<&[u8]>) -> ClientConn {
        ClientConn {
            egress: self.egress.connection(),
            tunnel_slots: Arc::new(Semaphore::new(
                self.config.limits.tunnels_per_connection as usize,
            )),
            client_cert_verified: client_cert.is_some(),
            client_cert: client_cert.map(|der| self.auth.client_cert_subscriber(der)),
        }
    }

    /// Authentication first: nothing else happens for an unauthenticated request. The subscriber
    /// only ever reaches the egress seal: never a log line, metric or header.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        conn: &ClientConn,
    ) -> Result<Subscriber, TunnelError> {
        match self.auth.check(headers, conn.client_cert) {
            AuthOutcome::Allowed(subscriber) => Ok(subscriber),
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
    pub async fn resolve_allowed(
        &self,
        target: &Target,
        clock: &SetupClock,
    ) -> Result<Vec<SocketAddr>, TunnelError> {
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
        clock.mark(SetupPhase::Resolve);
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
        clock.mark(SetupPhase::Policy);
        Ok(allowed)
    }

    /// Opens the TCP connection of a CONNECT tunnel: resolve, check, bind egress, connect.
    pub async fn open_tcp(
        &self,
        conn: &ClientConn,
        subscriber: Subscriber,
        target: &Target,
        clock: &SetupClock,
    ) -> Result<TcpStream, TunnelError> {
        let timeout = Duration::from_secs(self.config.timeouts.connect_secs);
        self.dial(conn, subscriber, target, clock, |source, dest| async move {
            let bound = cfr_egress::bind_tcp(source, dest).map_err(|e| connect_error(&e))?;
            clock.mark(SetupPhase::Bind);
            let connected = tokio::time::timeout(timeout, bound.connect()).await;
            clock.mark(SetupPhase::Connect);
            match connected {
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
    /// the target, so the kernel drops packets from any other peer.
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
    //# UDP proxies can use connected UDP sockets if their operating system supports
    //# them, as that allows the UDP proxy to rely on the kernel to only send it UDP
    //# packets that match the correct 5-tuple.
    pub async fn open_udp(
        &self,
        conn: &ClientConn,
        subscriber: Subscriber,
        target: &Target,
        clock: &SetupClock,
    ) -> Result<UdpSocket, TunnelError> {
        self.dial(conn, subscriber, target, clock, |source, dest| async move {
            // Bind and connect(2) in one: no packet leaves, so it all counts as binding.
            let sock = cfr_egress::bind_udp(source, dest).map_err(|e| connect_error(&e));
            clock.mark(SetupPhase::Bind);
            sock
        })
        .await
    }

    /// Tries each allowed address of `target` in preference order, from the egress address the
    /// connection's policy picks for its family; the first success wins, else the last error.
    async fn dial<T, F, Fut>(
        &self,
        conn: &ClientConn,
        subscriber: Subscriber,
        target: &Target,
        clock: &SetupClock,
        open: F,
    ) -> Result<T, TunnelError>
    where
        F: Fn(Option<IpAddr>, SocketAddr) -> Fut,
        Fut: Future<Output = Result<T, TunnelError>>,
    {
        let addrs = self.resolve_allowed(target, clock).await?;
        let mut last = TunnelError::new(
            ProxyError::DestinationUnavailable,
            "no address to connect to",
        );
        for dest in addrs {
            // The source is fixed here, once, for the tunnel's whole life.
            let source = match conn.egress.source_for_subscriber(dest.ip(), subscriber) {
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
