//! The life of one tunnel request: classify the head, authenticate, admit, dial, answer, pump, log.
use std::time::Instant;

use std::sync::Arc;

use cfr_proto::{ProxyError, Target};

use super::core::{ClientConn, Core};
use super::error::{error_response, TunnelError};
use super::exchange::Exchange;
use super::log::{log_tunnel_end, log_tunnel_refused, tunnel_id};
use super::setup_phases::{SetupClock, SetupPhase};
use super::tcp_pump::relay_tcp;
use super::udp_pump::{relay_udp, UdpUplink};
use super::TunnelKind;
use crate::metrics as m;

/// What the client asked for, once the request head is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    pub kind: TunnelKind,
    pub target: Target,
}

/// Validates a request head: method, `:protocol`, target syntax.
///
/// Classic CONNECT names the target in `:authority` (RFC 9114 §4.4, RFC 9113 §8.5); connect-udp
/// is an extended CONNECT (`:protocol connect-udp`, RFC 9298 §3.4) whose path follows the URI
/// template (RFC 9298 §3; `cfr_proto::target` quotes its rules).
pub fn classify(
    method: &http::Method,
    protocol: Option<&str>,
    uri: &http::Uri,
    udp_template: &cfr_proto::UdpTemplate,
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
            let target = udp_template.match_path(path).map_err(|e| {
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

/// One header-section limit for every front-end: a request over it gets 431 on its own stream,
/// whatever framing carried it (HTTP/1.1 heads are also bounded in bytes before parsing; HTTP/3's
/// QPACK decoder and HTTP/2's HPACK decoder at the same or a larger bound).
fn check_header_section_size(
    head: &http::request::Parts,
    protocol: Option<&str>,
    limit: usize,
) -> Result<(), TunnelError> {
    if header_section_size(head, protocol) <= limit {
        return Ok(());
    }
    metrics::counter!(m::DROPS, "reason" => "header_section_too_large").increment(1);
    Err(TunnelError {
        status: Some(431),
        ..TunnelError::new(
            ProxyError::HttpRequestError,
            "request header section too large",
        )
    })
}

/// The size of a request's header section as HTTP/2 and HTTP/3 count it, pseudo-header fields
/// included.
//= https://www.rfc-editor.org/rfc/rfc9114#section-4.2.2
//# The size of a field list is calculated based on the uncompressed size of fields, including
//# the length of the name and value in bytes plus an overhead of 32 bytes for each field.
pub fn header_section_size(head: &http::request::Parts, protocol: Option<&str>) -> usize {
    const OVERHEAD: usize = 32;
    let field = |name: &str, value: &str| name.len() + value.len() + OVERHEAD;
    let mut size = field(":method", head.method.as_str());
    if let Some(a) = head.uri.authority() {
        size += field(":authority", a.as_str());
    }
    if let Some(p) = protocol {
        size += field(":protocol", p);
    }
    if let Some(s) = head.uri.scheme_str() {
        size += field(":scheme", s);
    }
    if let Some(p) = head.uri.path_and_query() {
        size += field(":path", p.as_str());
    }
    size + head
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + OVERHEAD)
        .sum::<usize>()
}

/// The whole life of one tunnel request on any front-end: authenticate (before any DNS lookup or
/// dial), validate, admit against limits, open the destination side, answer, relay, log.
//= https://www.rfc-editor.org/rfc/rfc9114#section-4.4
//# A proxy that supports CONNECT establishes a TCP connection
//# ([RFC0793]) to the server identified in the :authority pseudo-header
//# field.  Once this connection is successfully established, the proxy
//# sends a HEADERS frame containing a 2xx series status code to the
//# client, as defined in Section 15.3 of [HTTP].
//
//= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
//# However, if
//# the "target_host" is a DNS name, the UDP proxy MUST perform DNS resolution
//# before replying to the HTTP request. If errors occur during this process, the
//# UDP proxy MUST reject the request and SHOULD send details using an appropriate
//# Proxy-Status header field [PROXY-STATUS].
pub async fn serve_request<E: Exchange>(
    core: &Core,
    conn: &ClientConn,
    head: &http::request::Parts,
    protocol: Option<&str>,
    mut exchange: E,
) {
    let started = Instant::now();
    let clock = SetupClock::start();
    let id = tunnel_id();
    core.request_seen(exchange.protocol());
    let request =
        check_header_section_size(head, protocol, core.config.limits.max_request_head_bytes)
            .and_then(|()| core.authenticate(&head.headers, conn))
            .and_then(|subscriber| {
                clock.mark(SetupPhase::Auth);
                classify(&head.method, protocol, &head.uri, &core.udp_template)
                    .map(|r| (subscriber, r))
            });
    let (subscriber, request) = match request {
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
    clock.mark(SetupPhase::Parse);
    let permit = match core.admit(conn) {
        Ok(p) => p,
        Err(err) => return refuse(id, request.kind, Some(&request.target), err, exchange).await,
    };
    clock.mark(SetupPhase::Admit);
    let kind = request.kind;
    let target = request.target;
    match kind {
        TunnelKind::Tcp => {
            let tcp = match core.open_tcp(conn, subscriber, &target, &clock).await {
                Ok(t) => t,
                Err(err) => return refuse(id, kind, Some(&target), err, exchange).await,
            };
            let Some((rx, tx)) = open_response(exchange, kind, false).await else {
                return;
            };
            clock.mark(SetupPhase::Respond);
            core.setup.record(&clock);
            let _active = ActiveTunnel::new(kind);
            let stats = relay_tcp(core, tcp, rx, tx).await;
            core.tunnel_ended(&stats);
            log_tunnel_end(&id, kind, &target, 200, &stats, started);
        }
        TunnelKind::Udp => {
            let sock = match core.open_udp(conn, subscriber, &target, &clock).await {
                Ok(s) => s,
                Err(err) => return refuse(id, kind, Some(&target), err, exchange).await,
            };
            let uplink = match UdpUplink::new(sock) {
                Ok(u) => Arc::new(u),
                Err(_) => {
                    let err = TunnelError::new(
                        ProxyError::ProxyInternalError,
                        "cannot set up the UDP socket",
                    );
                    return refuse(id, kind, Some(&target), err, exchange).await;
                }
            };
            let channels = exchange.udp_channels(&uplink);
            let Some((rx, tx)) = open_response(exchange, kind, true).await else {
                return;
            };
            clock.mark(SetupPhase::Respond);
            core.setup.record(&clock);
            let _active = ActiveTunnel::new(kind);
            let stats = relay_udp(core, &uplink, rx, tx, channels).await;
            core.tunnel_ended(&stats);
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
        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.4
        //# When using the Capsule Protocol, HTTP endpoints SHOULD send the Capsule-Protocol
        //# header field to simplify intermediary processing.
        //
        // RFC 9298 §3.3 and §3.5: the 101 / 2xx response starts the Capsule Protocol.
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
