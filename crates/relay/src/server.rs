//! The relay process: binds the listeners, accepts client connections within limits, and drains
//! gracefully on shutdown (GOAWAY, grace period, close).
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::RelayConfig;
use crate::http3;
use crate::metrics as m;
use crate::policy::DestinationPolicy;
use crate::resolve::Resolver;
use crate::tcp_front::TcpFront;
use crate::tls;
use crate::tunnel::Core;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running relay. `run` drives it; the handle's token starts the drain.
pub struct Relay {
    core: Arc<Core>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    /// The TLS/TCP fallback listener (HTTP/2, HTTP/1.1), unless `tcp_enabled = false`.
    tcp: Option<(tokio::net::TcpListener, TcpFront)>,
    tcp_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    clients: Arc<ClientTable>,
}

/// Lets another task stop a relay.
#[derive(Clone, Debug)]
pub struct RelayHandle {
    shutdown: CancellationToken,
}

impl RelayHandle {
    /// Starts the graceful drain (what SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Relay {
    /// Binds the HTTP/3 listener. `extra_tokens`: plaintext tokens accepted in addition to the
    /// configured hashes (the generated dev token).
    pub async fn bind(
        config: RelayConfig,
        resolver: Arc<dyn Resolver>,
        extra_tokens: &[String],
    ) -> Result<Relay, StartError> {
        config
            .validate()
            .map_err(|e| StartError::Config(e.to_string()))?;
        let auth = Authenticator::new(&config.auth, extra_tokens).map_err(StartError::Config)?;
        let mut policy = DestinationPolicy::new(&config.policy).map_err(StartError::Config)?;
        let egress = cfr_egress::EgressPool::new(&config.egress)
            .map_err(|e| StartError::Config(e.to_string()))?;
        for net in egress.prefixes() {
            policy.add_own_net(*net);
        }
        let tls = tls::server_config(
            &config.cert,
            &config.key,
            config.auth.client_ca.as_deref(),
            &[tls::ALPN_H3],
        )?;
        let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| StartError::Config(format!("TLS config unusable for QUIC: {e}")))?;
        let listen = config.listen;
        // Bind first so the own-address rule knows the real ports.
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
        server_config.transport_config(Arc::new(http3::transport_config(&config)));
        let (endpoint, local_addr, tcp_listener) = bind_listeners(&config, server_config)?;
        policy.add_own_socket(local_addr);
        let tcp_addr = match &tcp_listener {
            Some(l) => {
                let addr = l.local_addr().map_err(|source| StartError::Bind {
                    addr: listen,
                    source,
                })?;
                policy.add_own_socket(addr);
                Some(addr)
            }
            None => None,
        };
        let core = Arc::new(Core::new(config, auth, policy, egress, resolver));
        let tcp = match tcp_listener {
            Some(l) => Some((l, TcpFront::new(&core, local_addr.port())?)),
            None => None,
        };
        Ok(Relay {
            core,
            endpoint,
            local_addr,
            tcp,
            tcp_addr,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            clients: Arc::new(ClientTable::default()),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Address of the TLS/TCP fallback listener, if it is enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            shutdown: self.shutdown.clone(),
        }
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Accepts connections until shutdown, then drains: GOAWAY to every client, no new
    /// connections, open tunnels get `drain_secs` to finish, then everything is closed.
    pub async fn run(self) {
        let Relay {
            core,
            endpoint,
            mut tcp,
            shutdown,
            tasks,
            clients,
            ..
        } = self;
        // Cancelled when the grace period is over: TCP connections and tunnels still open are
        // dropped (QUIC ones end with the endpoint's close).
        let closed = CancellationToken::new();
        let front_ctx = tcp
            .as_ref()
            .map(|(_, front)| front.context(&core, &shutdown, &closed, &tasks));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    accept(&core, incoming, &clients, &shutdown, &tasks);
                }
                accepted = async { tcp.as_ref().expect("guarded").0.accept().await }, if tcp.is_some() => {
                    match accepted {
                        Ok((stream, peer)) => {
                            let limits = &core.config.limits;
                            match clients.admit(peer.ip(), limits.connections_per_client, limits.total_connections) {
                                Some(slot) => {
                                    let front = &tcp.as_ref().expect("guarded").1;
                                    let ctx = front_ctx.as_ref().expect("guarded");
                                    front.accept(ctx, stream, peer, slot);
                                }
                                None => {
                                    metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "connection_limit").increment(1);
                                    drop(stream);
                                }
                            }
                        }
                        // EMFILE and the like: keep serving what is open, retry shortly.
                        Err(e) => {
                            tracing::warn!(error = %e, "TCP accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        }
        // No new TCP connections during the drain.
        tcp.take();
        metrics::gauge!(m::DRAINING).set(1.0);
        let grace = Duration::from_secs(core.config.drain_secs);
        tracing::info!(
            grace_secs = grace.as_secs(),
            "draining: GOAWAY sent, waiting for open tunnels"
        );
        endpoint.set_server_config(None);
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!("drain grace period over; closing remaining tunnels");
        }
        closed.cancel();
        endpoint.close(quinn::VarInt::from_u32(0x100), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        metrics::gauge!(m::DRAINING).set(0.0);
        tracing::info!("relay stopped");
    }
}

/// Binds the QUIC endpoint and, unless disabled, the TCP listener. Without `listen_tcp` the TCP
/// listener takes the QUIC socket's port number; when `listen` asks for an ephemeral port and that
/// number is taken on TCP, both are bound again on a fresh port.
fn bind_listeners(
    config: &RelayConfig,
    server_config: quinn::ServerConfig,
) -> Result<(quinn::Endpoint, SocketAddr, Option<tokio::net::TcpListener>), StartError> {
    let listen = config.listen;
    let bind_err = |addr: SocketAddr| move |source| StartError::Bind { addr, source };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let endpoint =
            quinn::Endpoint::server(server_config.clone(), listen).map_err(bind_err(listen))?;
        let local_addr = endpoint.local_addr().map_err(bind_err(listen))?;
        if !config.tcp_enabled {
            return Ok((endpoint, local_addr, None));
        }
        let tcp_addr = config
            .listen_tcp
            .unwrap_or_else(|| SocketAddr::new(listen.ip(), local_addr.port()));
        match tcp_listener(tcp_addr) {
            Ok(l) => return Ok((endpoint, local_addr, Some(l))),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && listen.port() == 0
                    && config.listen_tcp.is_none()
                    && attempts < 16 =>
            {
                continue
            }
            Err(source) => {
                return Err(StartError::Bind {
                    addr: tcp_addr,
                    source,
                })
            }
        }
    }
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn accept(
    core: &Arc<Core>,
    incoming: quinn::Incoming,
    clients: &Arc<ClientTable>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) {
    let ip = incoming.remote_address().ip();
    let limits = &core.config.limits;
    let Some(slot) = clients.admit(ip, limits.connections_per_client, limits.total_connections)
    else {
        metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "connection_limit").increment(1);
        incoming.refuse();
        return;
    };
    let core = core.clone();
    let shutdown = shutdown.clone();
    let tasks2 = tasks.clone();
    let handshake = core.config.handshake_timeout();
    tasks.spawn(async move {
        let _slot = slot;
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "handshake refused");
                return;
            }
        };
        let quic = match tokio::time::timeout(handshake, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "handshake").increment(1);
                tracing::debug!(error = %e, "handshake failed");
                return;
            }
            Err(_) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "handshake_timeout")
                    .increment(1);
                return;
            }
        };
        let verified = quic
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .is_some_and(|chain| !chain.is_empty());
        metrics::counter!(m::CONNECTIONS, "protocol" => "h3").increment(1);
        metrics::gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);
        // Connection-level events may name the client, never a destination.
        tracing::info!(client = %quic.remote_address(), mtls = verified, "connection opened");
        let client = Arc::new(core.client_conn(verified));
        http3::serve_connection(core, quic.clone(), client, shutdown, tasks2).await;
        metrics::gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
        tracing::info!(client = %quic.remote_address(), "connection closed");
    });
}

/// Open connections per client address.
#[derive(Default)]
pub(crate) struct ClientTable {
    inner: Mutex<(HashMap<IpAddr, u32>, u32)>,
}

pub(crate) struct ClientSlot {
    table: Arc<ClientTable>,
    ip: IpAddr,
}

impl ClientTable {
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        per_client: u32,
        total: u32,
    ) -> Option<ClientSlot> {
        let mut g = self.inner.lock().expect("client table");
        let (map, count) = &mut *g;
        if *count >= total {
            return None;
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= per_client {
            return None;
        }
        *n += 1;
        *count += 1;
        Some(ClientSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut g = self.table.inner.lock().expect("client table");
        let (map, count) = &mut *g;
        *count -= 1;
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
