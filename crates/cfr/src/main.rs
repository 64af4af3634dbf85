//! `cfr`: the relay, its client, and their tools.
#![forbid(unsafe_code)]

mod client_cmd;
mod fleet_cmd;
mod seal_cmd;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use cfr_relay::config::{EgressPolicy, RelayConfig};
use cfr_relay::{auth, tls, HostsThenSystem, Relay};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

/// jemalloc with background purge threads: memory freed after a load peak (a flood of idle
/// connections) goes back to the system after its decay time, where glibc malloc kept it
/// (`cfr bench --only flood`, README "Memory after load").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "cfr",
    version,
    about = "Customer-Facing Relay: MASQUE CONNECT / CONNECT-UDP relay with per-tunnel random egress"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay (HTTP/3 on UDP).
    Relay(RelayArgs),
    /// Run a local SOCKS5 / HTTP proxy that tunnels through a relay.
    Client(client_cmd::ClientArgs),
    /// Generate a development CA and server certificate (and optionally a client certificate).
    Cert(CertArgs),
    /// Validate a relay config file or a fleet file and print the effective settings.
    CheckConfig {
        /// TOML config file (a fleet file has a `[fleet]` table).
        file: PathBuf,
    },
    /// A fleet of relays as one service: the nftables balancer.
    Fleet {
        #[command(subcommand)]
        command: fleet_cmd::FleetCommand,
    },
    /// Egress pool tools.
    Egress {
        #[command(subcommand)]
        command: EgressCommand,
    },
    /// Benchmarks on loopback: relayed vs direct, raw QUIC and a peer proxy; setup, scale, egress.
    Bench(cfr_bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum EgressCommand {
    /// Diagnose whether the configured egress prefixes work on this host, and how to fix them.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Egress prefix (repeatable); adds to the config's.
        #[arg(long = "egress-prefix", value_name = "CIDR")]
        egress_prefix: Vec<IpNet>,
    },
    /// Generate a sealing key (egress.sealing): a master key, or a relay key plus K-of-N shares.
    Keygen(seal_cmd::KeygenArgs),
    /// Write a relay key (seals from one epoch on, opens nothing earlier) from a master key.
    Derive(seal_cmd::DeriveArgs),
    /// Open a sealed egress address: print the subscriber handle, epoch and instance, or "no match".
    Open(seal_cmd::OpenArgs),
}

#[derive(Args, Debug)]
struct RelayArgs {
    /// TOML config file; flags override its values.
    #[arg(long, conflicts_with = "fleet")]
    config: Option<PathBuf>,
    /// Fleet file: run member `--instance` of the fleet (its listen address, server ID and egress
    /// share come from the file); flags override its values.
    #[arg(long, requires = "instance")]
    fleet: Option<PathBuf>,
    /// The member id to run, with `--fleet`.
    #[arg(long, requires = "fleet")]
    instance: Option<u32>,
    /// UDP address for HTTP/3 [default: [::]:4433].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// PEM certificate chain [default: certs/server.pem, generated if missing].
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key [default: certs/server.key].
    #[arg(long)]
    key: Option<PathBuf>,
    /// Allow destinations in this range even if reserved (repeatable), e.g. 127.0.0.0/8.
    #[arg(long = "allow-destination", value_name = "CIDR")]
    allow_destination: Vec<IpNet>,
    /// Egress prefix to draw per-tunnel source addresses from (repeatable).
    #[arg(long = "egress-prefix", value_name = "CIDR")]
    egress_prefix: Vec<IpNet>,
    /// Egress rotation policy: per-tunnel, per-connection, epoch.
    #[arg(long)]
    egress_policy: Option<EgressPolicy>,
    /// Epoch length for `--egress-policy epoch`.
    #[arg(long)]
    egress_epoch_secs: Option<u64>,
    /// Prometheus endpoint, e.g. 127.0.0.1:9090 (off by default).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Grace period for open tunnels on SIGTERM/SIGINT.
    #[arg(long)]
    drain_secs: Option<u64>,
    /// Static name resolution entry NAME=IP (repeatable), consulted before the system resolver.
    #[arg(long = "resolve", value_name = "NAME=IP")]
    resolve: Vec<String>,
    /// Accept every client without authentication. For tests and labs only.
    #[arg(long)]
    insecure_open_relay: bool,
    /// Serve a Provisioning Domain at /.well-known/pvd for this host name (`pvd.identifier`), so
    /// clients need only `cfr client --discover HOST`.
    #[arg(long, value_name = "HOST")]
    pvd_identifier: Option<String>,
    /// Print the listening address as a JSON line on stdout once ready (for test harnesses).
    #[arg(long, hide = true)]
    print_ready: bool,
}

#[derive(Args, Debug)]
struct CertArgs {
    /// Output directory.
    #[arg(long, default_value = "certs")]
    dir: PathBuf,
    /// Extra DNS name or IP for the server certificate (repeatable).
    #[arg(long = "name")]
    names: Vec<String>,
    /// Also issue a client certificate with this name (for mTLS), signed by the existing CA.
    #[arg(long)]
    client: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The bench's in-process relay would log every tunnel at info; keep its table readable.
    let default_filter = if matches!(cli.command, Command::Bench(_)) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_filter);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cfr: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Relay(args) => run_relay(args).await,
            Command::Client(args) => client_cmd::run(args).await,
            Command::Cert(args) => run_cert(args),
            Command::CheckConfig { file } => check_config(&file),
            Command::Fleet { command } => fleet_cmd::run(command),
            Command::Egress {
                command:
                    EgressCommand::Check {
                        config,
                        egress_prefix,
                    },
            } => egress_check(config.as_deref(), egress_prefix),
            Command::Egress {
                command: EgressCommand::Keygen(args),
            } => seal_cmd::keygen(args),
            Command::Egress {
                command: EgressCommand::Derive(args),
            } => seal_cmd::derive(args),
            Command::Egress {
                command: EgressCommand::Open(args),
            } => seal_cmd::open(args),
            Command::Bench(args) => cfr_bench::main(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("cfr: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colour only for a person at a terminal: a file, pipe or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn load_config(path: Option<&Path>) -> Result<RelayConfig, String> {
    match path {
        Some(p) => RelayConfig::from_file(p).map_err(|e| e.to_string()),
        None => Ok(RelayConfig::default()),
    }
}

fn check_config(file: &Path) -> Result<ExitCode, String> {
    if fleet_cmd::is_fleet_file(file) {
        return fleet_cmd::check(file);
    }
    let cfg = RelayConfig::from_file(file).map_err(|e| format!("invalid config: {e}"))?;
    // The one file the relay reads at start that check-config can check too (mode, format).
    if let Some(lb) = &cfg.quic_lb {
        lb.load().map_err(|e| format!("invalid config: {e}"))?;
    }
    println!("# {} is valid. Effective settings:", file.display());
    print!("{}", cfg.to_toml());
    Ok(ExitCode::SUCCESS)
}

fn egress_check(config: Option<&Path>, extra: Vec<IpNet>) -> Result<ExitCode, String> {
    let mut cfg = load_config(config)?;
    cfg.egress.prefixes.extend(extra);
    if cfg.egress.prefixes.is_empty() {
        return Err("no egress prefix configured: pass --egress-prefix CIDR or --config FILE with [egress] prefixes".into());
    }
    let report = cfr_egress::check::diagnose(&cfg.egress);
    print!("{report}");
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_cert(args: CertArgs) -> Result<ExitCode, String> {
    if let Some(client) = &args.client {
        let (c, k) = tls::generate_client_cert(&args.dir, client).map_err(|e| e.to_string())?;
        println!(
            "client certificate: {}\nclient key:         {}",
            c.display(),
            k.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let pki = tls::generate_dev_pki(&args.dir, &args.names).map_err(|e| e.to_string())?;
    println!(
        "CA certificate:     {}  (give this to clients: --ca)\nserver certificate: {}\nserver key:         {}",
        pki.ca_cert.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn apply_flags(cfg: &mut RelayConfig, args: &RelayArgs) -> Result<(), String> {
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(c) = &args.cert {
        cfg.cert = c.clone();
    }
    if let Some(k) = &args.key {
        cfg.key = k.clone();
    }
    cfg.policy
        .allow
        .extend(args.allow_destination.iter().copied());
    cfg.egress
        .prefixes
        .extend(args.egress_prefix.iter().copied());
    if let Some(p) = args.egress_policy {
        cfg.egress.policy = p;
    }
    if let Some(e) = args.egress_epoch_secs {
        cfg.egress.epoch_secs = e;
    }
    if args.metrics.is_some() {
        cfg.metrics = args.metrics;
    }
    if let Some(d) = args.drain_secs {
        cfg.drain_secs = d;
    }
    if args.insecure_open_relay {
        cfg.auth.insecure_open_relay = true;
    }
    if let Some(id) = &args.pvd_identifier {
        cfg.pvd.identifier = Some(id.clone());
    }
    for entry in &args.resolve {
        let (name, ip) = entry
            .split_once('=')
            .ok_or_else(|| format!("--resolve {entry}: expected NAME=IP"))?;
        let ip = ip
            .parse()
            .map_err(|_| format!("--resolve {entry}: `{ip}` is not an IP address"))?;
        cfg.resolver
            .hosts
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(ip);
    }
    Ok(())
}

async fn run_relay(args: RelayArgs) -> Result<ExitCode, String> {
    // Parsed into typed values here, validated once with the flags applied and before anything
    // is written to disk (`Relay::bind` re-checks what library callers hand it).
    let mut cfg = match (&args.fleet, args.instance, args.config.as_deref()) {
        (Some(file), Some(id), _) => fleet_cmd::member_config(file, id)?,
        (_, _, Some(p)) => RelayConfig::read_file(p).map_err(|e| e.to_string())?,
        _ => RelayConfig::default(),
    };
    apply_flags(&mut cfg, &args)?;
    cfg.validate()
        .map_err(|e| format!("invalid settings: {e}"))?;

    // A fresh clone has no certificate: make a development PKI where the config expects one.
    if !cfg.cert.exists() && !cfg.key.exists() {
        let dir = cfg
            .cert
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cfg.state_dir.clone());
        let pki = tls::generate_dev_pki(&dir, &[]).map_err(|e| e.to_string())?;
        if pki.server_cert != cfg.cert || pki.server_key != cfg.key {
            return Err(format!(
                "{} does not exist; generated a dev PKI in {} — point --cert/--key at it or run `cfr cert`",
                cfg.cert.display(),
                dir.display()
            ));
        }
        tracing::warn!(dir = %dir.display(), "no certificate found: generated a development CA and server certificate");
    }

    let mut extra_tokens = Vec::new();
    let mut dev_token = None;
    let auth_configured = !cfg.auth.token_sha256.is_empty()
        || cfg.auth.token_file.is_some()
        || cfg.auth.client_ca.is_some();
    if cfg.auth.insecure_open_relay {
        tracing::warn!("--insecure-open-relay: ANYONE who can reach this port can use the relay. Tests and labs only.");
    } else if !auth_configured {
        let token = auth::load_or_create_dev_token(&cfg.state_dir)
            .map_err(|e| format!("cannot create a token in {}: {e}", cfg.state_dir.display()))?;
        extra_tokens.push(token.clone());
        dev_token = Some(token);
    }
    if cfg.egress.prefixes.is_empty() {
        tracing::warn!(
            "NO EGRESS POOL CONFIGURED: tunnels leave from the kernel-chosen source address. \
             Destinations see a stable relay address (not private). Set --egress-prefix; see `cfr egress check`."
        );
    }
    if let Some(addr) = cfg.metrics {
        cfr_relay::metrics::install_prometheus(addr)?;
    }

    let resolver = Arc::new(HostsThenSystem {
        hosts: cfg.resolver.hosts.clone(),
        hosts_only: cfg.resolver.hosts_only,
    });
    let state_dir = cfg.state_dir.clone();
    let pvd_identifier = cfg.pvd.identifier.clone();
    let relay = Relay::bind(cfg, resolver, &extra_tokens)
        .await
        .map_err(|e| e.to_string())?;
    let addr = relay.local_addr();
    print_usage(
        addr,
        &state_dir,
        dev_token.as_deref(),
        pvd_identifier.as_deref(),
    );
    if args.print_ready {
        println!("{{\"ready\":true,\"listen\":\"{addr}\"}}");
    }
    let handle = relay.handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining (signal again to stop now)");
        handle.shutdown();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting for tunnels");
        std::process::exit(1);
    });
    relay.run().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn print_usage(addr: SocketAddr, state_dir: &Path, token: Option<&str>, pvd: Option<&str>) {
    let host = if addr.ip().is_unspecified() || addr.ip().is_loopback() {
        "localhost".to_owned()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let url = format!("https://{host}:{}", addr.port());
    let ca = state_dir.join("ca.pem");
    eprintln!();
    eprintln!("cfr relay is listening on {addr} (HTTP/3, UDP)");
    eprintln!("  relay URL: {url}");
    if let Some(t) = token {
        eprintln!(
            "  token:     {t}   (stored in {})",
            state_dir.join("token").display()
        );
    }
    eprintln!();
    eprintln!("Connect a client (local SOCKS5 on 127.0.0.1:1080, HTTP proxy on 127.0.0.1:8080):");
    let token_arg = match token {
        Some(_) => format!(" --token-file {}", state_dir.join("token").display()),
        None => String::new(),
    };
    eprintln!(
        "  cargo run --release -p cfr -- client --relay {url} --ca {}{token_arg} --socks5 127.0.0.1:1080 --http 127.0.0.1:8080",
        ca.display()
    );
    if let Some(id) = pvd {
        let id = id.strip_suffix('.').unwrap_or(id);
        eprintln!(
            "or let it learn the relays from this relay's PvD (https://{id}:{}/.well-known/pvd):",
            addr.port()
        );
        eprintln!(
            "  cargo run --release -p cfr -- client --discover {id}:{} --ca {}{token_arg}",
            addr.port(),
            ca.display()
        );
    }
    eprintln!("then e.g.:  curl --socks5-hostname 127.0.0.1:1080 https://example.com/");
    eprintln!();
}
