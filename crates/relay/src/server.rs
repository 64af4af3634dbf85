//! The relay process: binds the listeners, accepts client connections within limits, and drains
//! gracefully on shutdown (GOAWAY, grace period, close).
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::{ConfigError, RelayConfig};
use crate::front::FrontCtx;
use crate::http3;
use crate::metrics as m;
use crate::policy::DestinationPolicy;
use crate::quic_front;
use crate::quic_lb;
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
    Config(#[from] ConfigError),
    #[error("TLS configuration unusable for QUIC: {0}")]
    QuicTls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("egress.sealing_key: {0}")]
    Sealing(#[from] cfr_egress::seal::SealError),
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
    /// The TLS/TCP fallback front-end (HTTP/2, HTTP/1.1), unless `tcp_enabled = false`.
    tcp: Option<TcpFront>,
    tcp_addr: Option<SocketAddr>,
    ctx: FrontCtx,
    /// Cancelled once the drain has begun: no listener accepts new connections any more.
    draining: CancellationToken,
}

/// Lets another task stop a relay.
#[derive(Clone, Debug)]
pub struct RelayHandle {
    shutdown: CancellationToken,
    draining: CancellationToken,
}

impl RelayHandle {
    /// Starts the graceful drain (what SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Resolves once the drain has begun: the listeners take no new connections (an event for
    /// tests and supervisors to wait on instead of the clock).
    pub async fn draining(&self) {
        self.draining.cancelled().await
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
        // The one validation of this start: `cfr relay` applies its flags to the parsed file first;
        // library callers build configs in code.
        config.validate()?;
        let auth = Authenticator::new(&config.auth, extra_tokens)?;
        let mut policy = DestinationPolicy::new(&config.policy);
        let egress = sealed_pool(&config, &auth)?;
        for net in egress.prefixes() {
            policy.add_own_net(*net);
        }
        let tls = tls::server_config(
            &config.cert,
            &config.key,
            config.auth.client_ca.as_deref(),
            &[tls::ALPN_H3],
        )?;
        let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let lb_cids = config.quic_lb.as_ref().map(|lb| lb.load()).transpose()?;
        if let Some(encoder) = &lb_cids {
            let lb = encoder.config();
            tracing::info!(
                server_id = %encoder.server_id(),
                config_rotation = lb.config_rotation(),
                algorithm = ?lb.algorithm(),
                cid_len = lb.cid_len(),
                "issuing QUIC-LB connection IDs"
            );
        }
        let listen = config.listen;
        // Bind first so the own-address rule knows the real ports.
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
        server_config.transport_config(Arc::new(http3::transport_config(&config)));
        let (endpoint, local_addr, tcp_listener) =
            bind_listeners(&config, quic_lb::endpoint_config(lb_cids), server_config)?;
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
        let tcp = match tcp_listener {
            Some(l) => Some(TcpFront::new(&config, l)?),
            None => None,
        };
        let pvd =
            crate::pvd::PvdPublisher::new(&config, local_addr.port(), tcp_addr.map(|a| a.port()))
                .map_err(StartError::Config)?;
        let mut core = Core::new(config, auth, policy, egress, resolver);
        core.pvd = pvd;
        let core = Arc::new(core);
        Ok(Relay {
            ctx: FrontCtx::new(core.clone(), local_addr.port()),
            core,
            endpoint,
            local_addr,
            tcp,
            tcp_addr,
            draining: CancellationToken::new(),
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
            shutdown: self.ctx.shutdown.clone(),
            draining: self.draining.clone(),
        }
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Runs every front-end until shutdown, then drains: GOAWAY to every client, no new
    /// connections, open tunnels get `drain_secs` to finish, then everything is closed.
    pub async fn run(self) {
        let Relay {
            core,
            endpoint,
            tcp,
            ctx,
            draining,
            ..
        } = self;
        // Each accept loop returns when the drain starts; the TCP listener closes with its loop.
        let tcp_front = async {
            if let Some(front) = tcp {
                front.accept_loop(&ctx).await;
            }
        };
        // An idle relay still erases expired sealing keys on time.
        if let Some(sealer) = core.egress.sealer().cloned() {
            let shutdown = ctx.shutdown.clone();
            ctx.tasks.spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = sealer.erase_on_schedule() => {}
                }
            });
        }
        tokio::join!(quic_front::accept_loop(&endpoint, &ctx), tcp_front);
        let FrontCtx { closed, tasks, .. } = ctx;
        metrics::gauge!(m::DRAINING).set(1.0);
        let grace = Duration::from_secs(core.config.drain_secs);
        tracing::info!(
            grace_secs = grace.as_secs(),
            "draining: GOAWAY sent, waiting for open tunnels"
        );
        // The QUIC endpoint keeps its server config: new connections are refused below.
        draining.cancel();
        tasks.close();
        let grace_over = async {
            if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
                tracing::warn!("drain grace period over; resetting remaining tunnels");
                closed.cancel();
                // Every open tunnel now resets its client stream (outcome `drained`) and its
                // connection closes once the resets are out; this bounds the stragglers.
                let _ = tokio::time::timeout(CLOSE_LINGER, tasks.wait()).await;
            }
            closed.cancel();
        };
        // New QUIC connections during the drain get an immediate CONNECTION_CLOSE
        // (CONNECTION_REFUSED) instead of silence until the client's own timeout.
        let refuse_new = async {
            loop {
                tokio::select! {
                    _ = closed.cancelled() => break,
                    incoming = endpoint.accept() => match incoming {
                        Some(incoming) => incoming.refuse(),
                        None => break,
                    },
                }
            }
        };
        tokio::join!(grace_over, refuse_new);
        endpoint.close(quinn::VarInt::from_u32(0x100), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        metrics::gauge!(m::DRAINING).set(0.0);
        tracing::info!("relay stopped");
    }
}

/// The egress pool, sealing addresses when `egress.sealing` is on: reads the key file (the master
/// key, if given, is erased once the relay's chain key is derived), checks every prefix has the host
/// bits the sealed plaintext needs and every subscriber handle fits the key's handle bits.
fn sealed_pool(
    config: &RelayConfig,
    auth: &Authenticator,
) -> Result<cfr_egress::EgressPool, StartError> {
    let sealer = cfr_egress::Sealer::from_config(&config.egress, cfr_egress::seal::unix_now())?;
    if let Some(s) = &sealer {
        let max = s.params().max_handle();
        if auth.handles().any(|h| h > max) {
            return Err(ConfigError::Invalid {
                key: "auth.subscribers",
                message: format!(
                    "handles must be at most {max} ({} handle bits in the sealing key)",
                    s.params().handle_bits
                ),
            }
            .into());
        }
        let anonymous = auth.credentials_without_handle();
        if anonymous > 0 {
            tracing::warn!(
                tokens = anonymous,
                "egress sealing is on but some accepted tokens have no auth.subscribers handle: their tunnels are sealed as anonymous"
            );
        }
    }
    Ok(cfr_egress::EgressPool::with_sealer(&config.egress, sealer).map_err(ConfigError::Egress)?)
}

/// How long connections get after the grace period to deliver their tunnels' resets and close.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Receive and send buffer of the QUIC endpoint's UDP socket.
const QUIC_SOCKET_BUFFER: usize = 4 << 20;

/// Binds the QUIC endpoint and, unless disabled, the TCP listener. Without `listen_tcp` the TCP
/// listener takes the QUIC socket's port number; when `listen` asks for an ephemeral port and that
/// number is taken on TCP, both are bound again on a fresh port.
fn bind_listeners(
    config: &RelayConfig,
    endpoint_config: quinn::EndpointConfig,
    server_config: quinn::ServerConfig,
) -> Result<(quinn::Endpoint, SocketAddr, Option<tokio::net::TcpListener>), StartError> {
    let listen = config.listen;
    let bind_err = |addr: SocketAddr| move |source| StartError::Bind { addr, source };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let socket = std::net::UdpSocket::bind(listen).map_err(bind_err(listen))?;
        // One socket carries every client's packets: a default-size receive buffer (~90 packets)
        // overflows on a burst while the endpoint task waits for a CPU. Limits, not allocations;
        // the kernel caps them at net.core.{r,w}mem_max.
        let buffers = socket2::SockRef::from(&socket);
        let _ = buffers.set_recv_buffer_size(QUIC_SOCKET_BUFFER);
        let _ = buffers.set_send_buffer_size(QUIC_SOCKET_BUFFER);
        let endpoint = quinn::Endpoint::new(
            endpoint_config.clone(),
            Some(server_config.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err(listen))?;
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
