//! Metric names. Labels never hold a client address, destination, token or egress address: only
//! kinds, outcomes (Proxy-Status error tokens) and reasons from fixed sets.
use std::net::SocketAddr;

pub const CONNECTIONS: &str = "cfr_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "cfr_connections_active";
pub const CONNECTIONS_REFUSED: &str = "cfr_connections_refused_total";
pub const TUNNELS: &str = "cfr_tunnels_total";
pub const TUNNELS_ACTIVE: &str = "cfr_tunnels_active";
pub const BYTES: &str = "cfr_bytes_total";
pub const DATAGRAMS: &str = "cfr_datagrams_total";
pub const DROPS: &str = "cfr_drops_total";
pub const AUTH_FAILURES: &str = "cfr_auth_failures_total";
pub const POLICY_REFUSALS: &str = "cfr_policy_refusals_total";
pub const DRAINING: &str = "cfr_draining";
pub const REQUESTS: &str = "cfr_requests_total";
pub const HANDSHAKES_RETRIED: &str = "cfr_quic_retries_total";
pub const REQUESTS_MALFORMED: &str = "cfr_requests_malformed_total";

/// Describes every metric once, so a scrape shows HELP lines even before traffic.
pub fn describe() {
    metrics::describe_counter!(
        CONNECTIONS,
        "Client connections accepted, by front-end protocol"
    );
    metrics::describe_gauge!(CONNECTIONS_ACTIVE, "Client connections currently open");
    metrics::describe_counter!(CONNECTIONS_REFUSED, "Client connections refused, by reason");
    metrics::describe_counter!(
        TUNNELS,
        "Tunnel requests by kind and outcome (ok or a Proxy-Status error token)"
    );
    metrics::describe_gauge!(TUNNELS_ACTIVE, "Tunnels currently open, by kind");
    metrics::describe_counter!(
        BYTES,
        "Tunnel payload bytes by kind and direction (up = towards the destination)"
    );
    metrics::describe_counter!(DATAGRAMS, "UDP datagrams relayed by direction");
    metrics::describe_counter!(
        DROPS,
        "Datagrams, tunnels or connections dropped, by reason"
    );
    metrics::describe_counter!(
        AUTH_FAILURES,
        "Requests refused for missing or invalid credentials"
    );
    metrics::describe_counter!(POLICY_REFUSALS, "Tunnels refused by the destination policy");
    metrics::describe_gauge!(DRAINING, "1 while the relay drains before shutdown");
    metrics::describe_counter!(
        REQUESTS,
        "Requests by front-end protocol (h3, h2, http/1.1)"
    );
    metrics::describe_counter!(
        HANDSHAKES_RETRIED,
        "QUIC Initials answered with a Retry (handshake rate or half-open count high)"
    );
    metrics::describe_counter!(
        REQUESTS_MALFORMED,
        "Request heads refused before any tunnel logic (400/431), by front-end protocol"
    );
}

/// Installs the Prometheus recorder and its HTTP listener (`GET /metrics`).
pub fn install_prometheus(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    describe();
    cfr_egress::describe_metrics();
    // Series without labels exist from the start, so the first scrape shows them (at 0) and a
    // rate() over them has a baseline; labelled series appear with their first event.
    metrics::counter!(AUTH_FAILURES).absolute(0);
    metrics::counter!(POLICY_REFUSALS).absolute(0);
    metrics::gauge!(CONNECTIONS_ACTIVE).set(0.0);
    metrics::gauge!(DRAINING).set(0.0);
    Ok(())
}
