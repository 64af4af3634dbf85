//! `cfr client`: local SOCKS5 / HTTP proxy listeners that tunnel through one or more relays.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cfr_client::discover::{Discovery, PvdLocation};
use cfr_client::select::{Policy, RelaySet};
use cfr_client::{
    ClientConfig, ClientError, DatagramMode, RelayUrl, TcpTunnel, TransportMode, Trust,
    TunnelOpener, UdpTunnel,
};
use cfr_proto::Target;
use clap::Args;
use tokio::net::TcpListener;

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Relay URL, e.g. https://relay.example:4433 (repeatable).
    #[arg(long = "relay", value_name = "URL")]
    pub relay: Vec<String>,
    /// File with one relay URL per line (`#` starts a comment); adds to --relay.
    #[arg(long = "relay-list", value_name = "FILE")]
    pub relay_list: Vec<PathBuf>,
    /// Learn the relays from the operator's Provisioning Domain: HOST[:PORT] (fetches
    /// https://HOST[:PORT]/.well-known/pvd, port 443 by default) or the PvD's full https:// URL.
    #[arg(long, value_name = "HOST[:PORT]|URL", conflicts_with_all = ["relay", "relay_list"])]
    pub discover: Option<String>,
    /// How each new tunnel picks a relay: random, lowest-rtt, ordered (first usable = failover).
    #[arg(long = "select", value_name = "POLICY", default_value = "random", value_parser = parse_policy)]
    pub select: Policy,
    /// Bearer token for the relay (visible in `ps`; prefer --token-file).
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the bearer token (surrounding whitespace is trimmed).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM file with the CA(s) that signed the relay's certificate [default: system roots].
    #[arg(long, value_name = "FILE", conflicts_with = "pin_cert")]
    pub ca: Option<PathBuf>,
    /// The relay's exact certificate (PEM or DER); trusted regardless of name and CA.
    #[arg(long, value_name = "FILE")]
    pub pin_cert: Option<PathBuf>,
    /// Client certificate (PEM) presented to the relay for mTLS (`auth.client_ca` on the relay).
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Local SOCKS5 listener (CONNECT + UDP ASSOCIATE), or `off`.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:1080", value_parser = parse_listen)]
    pub socks5: Listen,
    /// Local HTTP CONNECT proxy listener [default: off].
    #[arg(long, value_name = "ADDR:PORT|off", value_parser = parse_listen)]
    pub http: Option<Listen>,
    /// Require this username on the SOCKS5 listener (RFC 1929); needs --socks-pass.
    #[arg(long, value_name = "USER", requires = "socks_pass")]
    pub socks_user: Option<String>,
    /// Password for --socks-user.
    #[arg(long, value_name = "PASS", requires = "socks_user")]
    pub socks_pass: Option<String>,
    /// Always carry UDP in DATAGRAM capsules on the request stream, even if the relay offers
    /// QUIC datagrams (for paths that drop them).
    #[arg(long)]
    pub capsules: bool,
    /// QUIC + HTTP/3 handshake timeout per relay, in seconds (also bounds the TLS/TCP handshake).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub connect_timeout_secs: u64,
    /// How to reach relays: auto (HTTP/3, falling back to the relay's TLS/TCP front-end on the
    /// same port — HTTP/2, else HTTP/1.1 — when the HTTP/3 handshake fails), h3, or tcp.
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = parse_transport)]
    pub transport: TransportMode,
    /// Print the bound local addresses as a JSON line on stdout once listening (for tests).
    #[arg(long, hide = true)]
    pub print_ready: bool,
}

/// A listener address or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    On(SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Listen::Off);
    }
    // A bare port means loopback: local proxies should not be reachable from other hosts by default.
    if let Ok(port) = s.parse::<u16>() {
        return Ok(Listen::On(SocketAddr::from(([127, 0, 0, 1], port))));
    }
    s.parse()
        .map(Listen::On)
        .map_err(|_| format!("{s:?}: expected ADDR:PORT (e.g. 127.0.0.1:1080), a port, or off"))
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse()
}

fn parse_transport(s: &str) -> Result<TransportMode, String> {
    s.parse()
}

/// Relay URLs from a list file: one per line, `#` to end of line is a comment, blanks ignored.
pub fn parse_relay_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn read_token_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(token.to_owned())
}

/// Everything from the flags that does not touch the network: relay configs and listeners.
fn relay_configs(args: &ClientArgs) -> Result<Vec<ClientConfig>, String> {
    let mut urls = args.relay.clone();
    for file in &args.relay_list {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read relay list {}: {e}", file.display()))?;
        let listed = parse_relay_list(&text);
        if listed.is_empty() {
            return Err(format!("relay list {} has no relay URL", file.display()));
        }
        urls.extend(listed);
    }
    if urls.is_empty() {
        return Err(
            "no relay: pass --relay https://HOST:PORT, --relay-list FILE or --discover HOST".into(),
        );
    }
    let mut seen = std::collections::HashSet::new();
    urls.retain(|u| seen.insert(u.clone()));
    for u in &urls {
        RelayUrl::parse(u).map_err(|e| format!("--relay: {e}"))?;
    }
    let base = base_config(args)?;
    Ok(urls
        .into_iter()
        .map(|url| ClientConfig {
            relay: url,
            ..base.clone()
        })
        .collect())
}

/// Trust, credentials and timeouts from the flags, for every relay (the URL is left empty).
fn base_config(args: &ClientArgs) -> Result<ClientConfig, String> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(f)) => Some(read_token_file(f)?),
        (None, None) => None,
    };
    let trust = match (&args.ca, &args.pin_cert) {
        (Some(ca), _) => Trust::CaFile(ca.clone()),
        (None, Some(pin)) => {
            Trust::pinned_from_file(pin).map_err(|e| format!("--pin-cert: {e}"))?
        }
        (None, None) => Trust::System,
    };
    if args.connect_timeout_secs == 0 {
        return Err("--connect-timeout-secs must be at least 1".into());
    }
    let mut c = ClientConfig::new(String::new(), trust);
    c.token = token;
    c.connect_timeout = Duration::from_secs(args.connect_timeout_secs);
    c.client_cert = args.client_cert.clone().zip(args.client_key.clone());
    c.transport = args.transport;
    if args.capsules {
        c.datagrams = DatagramMode::Capsules;
    }
    Ok(c)
}

/// Where tunnels go: a fixed relay list, or the relays a PvD lists.
#[derive(Clone)]
enum Relays {
    Listed(RelaySet),
    Discovered(Discovery),
}

impl Relays {
    /// Flags → relays; `--discover` fetches and checks the PvD now (its errors end the client).
    async fn from_args(args: &ClientArgs) -> Result<Relays, String> {
        let Some(arg) = &args.discover else {
            let configs = relay_configs(args)?;
            let set = RelaySet::new(configs, args.select).map_err(|e| e.to_string())?;
            return Ok(Relays::Listed(set));
        };
        let location = PvdLocation::parse(arg).map_err(|e| format!("--discover: {e}"))?;
        let base = base_config(args)?;
        let d = Discovery::start(location, base, args.select)
            .await
            .map_err(|e| e.to_string())?;
        let (tcp, udp) = d.relays();
        eprintln!(
            "cfr client: PvD {} lists {} relay(s) for TCP and {} for UDP",
            d.url(),
            tcp.len(),
            udp.len()
        );
        for r in tcp {
            eprintln!("  tcp via {r}");
        }
        for r in udp {
            eprintln!("  udp via {r}");
        }
        Ok(Relays::Discovered(d))
    }

    fn count(&self) -> usize {
        match self {
            Relays::Listed(s) => s.status().len(),
            Relays::Discovered(d) => {
                let (tcp, udp) = d.relays();
                tcp.len() + udp.len()
            }
        }
    }

    async fn close(&self) {
        match self {
            Relays::Listed(s) => s.close().await,
            Relays::Discovered(d) => d.close().await,
        }
    }
}

impl TunnelOpener for Relays {
    async fn connect_tcp(&self, target: &Target) -> Result<TcpTunnel, ClientError> {
        match self {
            Relays::Listed(s) => s.connect_tcp(target).await,
            Relays::Discovered(d) => d.connect_tcp(target).await,
        }
    }
    async fn connect_udp(&self, target: &Target) -> Result<UdpTunnel, ClientError> {
        match self {
            Relays::Listed(s) => s.connect_udp(target).await,
            Relays::Discovered(d) => d.connect_udp(target).await,
        }
    }
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))
}

fn json_addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "null".to_owned(), |a| format!("\"{a}\""))
}

pub async fn run(args: ClientArgs) -> Result<ExitCode, String> {
    let socks_auth = match (&args.socks_user, &args.socks_pass) {
        (Some(u), Some(p)) => {
            // RFC 1929 §2: ULEN and PLEN are one byte each.
            if u.is_empty() || u.len() > 255 || p.is_empty() || p.len() > 255 {
                return Err("--socks-user and --socks-pass must be 1..=255 bytes".into());
            }
            Some((u.clone(), p.clone()))
        }
        _ => None,
    };
    let socks_addr = match args.socks5 {
        Listen::On(a) => Some(a),
        Listen::Off => None,
    };
    let http_addr = match args.http {
        Some(Listen::On(a)) => Some(a),
        _ => None,
    };
    if socks_addr.is_none() && http_addr.is_none() {
        return Err("nothing to listen on: --socks5 is off and --http is not set".into());
    }
    if socks_addr.is_none() && socks_auth.is_some() {
        return Err("--socks-user needs a SOCKS5 listener (--socks5 is off)".into());
    }
    let set = Relays::from_args(&args).await?;
    let relay_count = set.count();

    let mut tasks = tokio::task::JoinSet::new();
    let mut bound_socks = None;
    let mut bound_http = None;
    if let Some(addr) = socks_addr {
        let listener = bind("SOCKS5", addr).await?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        if !local.ip().is_loopback() && socks_auth.is_none() {
            tracing::warn!(%local, "SOCKS5 listener is not on loopback and has no --socks-user: anyone who can reach it can use your relay");
        }
        eprintln!("cfr client: SOCKS5 proxy on {local} (CONNECT and UDP ASSOCIATE; names are resolved at the relay, like socks5h)");
        bound_socks = Some(local);
        let (set, auth) = (set.clone(), socks_auth.clone());
        tasks.spawn(async move {
            (
                "SOCKS5",
                cfr_client::local::socks5::serve(listener, set, auth).await,
            )
        });
    }
    if let Some(addr) = http_addr {
        let listener = bind("the HTTP proxy", addr).await?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        if !local.ip().is_loopback() {
            tracing::warn!(%local, "HTTP proxy listener is not on loopback and has no authentication: anyone who can reach it can use your relay");
        }
        eprintln!("cfr client: HTTP proxy on {local} (CONNECT only)");
        bound_http = Some(local);
        let set = set.clone();
        tasks.spawn(async move {
            (
                "HTTP proxy",
                cfr_client::local::http_proxy::serve(listener, set).await,
            )
        });
    }
    eprintln!(
        "cfr client: {relay_count} relay(s), selection policy {}, transport {}",
        args.select, args.transport
    );
    if args.print_ready {
        println!(
            "{{\"ready\":true,\"socks5\":{},\"http\":{}}}",
            json_addr(bound_socks),
            json_addr(bound_http)
        );
    }

    // Connect ahead of the first tunnel; an unreachable relay is not fatal: it is retried in the
    // background and for new tunnels. (Discovered relay sets warm up by themselves.)
    if let Relays::Listed(warm) = set.clone() {
        tokio::spawn(async move {
            let results = warm.warm_up().await;
            let status = warm.status();
            for (relay, result) in results {
                let transport = status
                    .iter()
                    .find(|s| s.relay == relay)
                    .and_then(|s| s.protocol)
                    .unwrap_or("none");
                match result {
                    Ok(rtt) => {
                        tracing::info!(%relay, transport, rtt_ms = rtt.as_millis() as u64, "relay connected")
                    }
                    Err(e) => {
                        tracing::warn!(%relay, error = %e, "relay unreachable at start; retrying in the background and for new tunnels")
                    }
                }
            }
        });
    }

    tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!("shutdown requested; closing relay connections");
            let _ = tokio::time::timeout(Duration::from_secs(2), set.close()).await;
            Ok(ExitCode::SUCCESS)
        }
        Some(ended) = tasks.join_next() => match ended {
            Ok((what, Err(e))) => Err(format!("{what} listener failed: {e}")),
            Ok((what, Ok(()))) => Err(format!("{what} listener stopped")),
            Err(e) => Err(format!("listener task failed: {e}")),
        },
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install SIGTERM/SIGINT handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_list_skips_comments_and_blank_lines() {
        let text =
            "# relays\nhttps://a.example:4433\n\n  https://b.example  # backup\n#https://c\n";
        assert_eq!(
            parse_relay_list(text),
            ["https://a.example:4433", "https://b.example"]
        );
    }

    #[test]
    fn listen_accepts_addr_port_bare_port_and_off() {
        assert_eq!(parse_listen("off"), Ok(Listen::Off));
        assert_eq!(
            parse_listen("1080"),
            Ok(Listen::On("127.0.0.1:1080".parse().unwrap()))
        );
        assert_eq!(
            parse_listen("[::1]:0"),
            Ok(Listen::On("[::1]:0".parse().unwrap()))
        );
        assert!(parse_listen("localhost:1080").is_err());
    }
}
