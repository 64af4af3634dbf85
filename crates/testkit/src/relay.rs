//! A relay on loopback in one line, with a client already configured to trust and authenticate
//! to it.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use cfr_client::{ClientConfig, FrontClient, FrontVersion, RelayClient, Trust};
use cfr_relay::config::RelayConfig;
use cfr_relay::{HostsThenSystem, Relay, RelayHandle, Resolver};
use tokio::task::JoinHandle;

/// The token every test relay accepts unless a test configures otherwise.
pub const TEST_TOKEN: &str = "cfr-test-token";

/// Name the test resolver maps to 127.0.0.1.
pub const ORIGIN_NAME: &str = "origin.test";

/// A running relay owned by a test; drained and stopped on [`TestRelay::stop`] or aborted on drop.
pub struct TestRelay {
    pub addr: SocketAddr,
    /// The TLS/TCP fallback listener (HTTP/2, HTTP/1.1), unless the config disabled it.
    pub tcp_addr: Option<SocketAddr>,
    pub ca_pem: PathBuf,
    pub token: String,
    pub dir: tempfile::TempDir,
    handle: RelayHandle,
    core: Arc<cfr_relay::tunnel::Core>,
    task: Option<JoinHandle<()>>,
}

/// The configuration a test relay starts from: loopback listener, the test token, loopback
/// destinations allowed, and a hosts-only resolver (`origin.test` → 127.0.0.1, `origin6.test` → ::1,
/// `dual.test` → both).
pub fn test_config(dir: &std::path::Path) -> RelayConfig {
    let pki = cfr_relay::tls::generate_dev_pki(dir, &[]).expect("dev PKI");
    let mut cfg = RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: pki.server_cert,
        key: pki.server_key,
        state_dir: dir.to_owned(),
        ..RelayConfig::default()
    };
    cfg.auth.token_sha256 = vec![cfr_relay::config::TokenHash::of(TEST_TOKEN)];
    cfg.policy.allow = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    cfg.resolver.hosts_only = true;
    let v4: IpAddr = "127.0.0.1".parse().unwrap();
    let v6: IpAddr = "::1".parse().unwrap();
    cfg.resolver.hosts.insert(ORIGIN_NAME.into(), vec![v4]);
    cfg.resolver.hosts.insert("origin6.test".into(), vec![v6]);
    cfg.resolver.hosts.insert("dual.test".into(), vec![v6, v4]);
    cfg.timeouts.connect_secs = 3;
    cfg.timeouts.dns_secs = 2;
    cfg.drain_secs = 5;
    cfg
}

impl TestRelay {
    /// A relay with [`test_config`].
    pub async fn start() -> TestRelay {
        Self::start_with(|_| {}).await
    }

    /// A relay with [`test_config`] adjusted by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut RelayConfig)) -> TestRelay {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = test_config(dir.path());
        adjust(&mut cfg);
        let resolver: Arc<dyn Resolver> = Arc::new(HostsThenSystem {
            hosts: cfg.resolver.hosts.clone(),
            hosts_only: cfg.resolver.hosts_only,
        });
        Self::start_with_resolver(dir, cfg, resolver).await
    }

    /// A relay with a custom resolver (e.g. one that never answers).
    pub async fn start_with_resolver(
        dir: tempfile::TempDir,
        cfg: RelayConfig,
        resolver: Arc<dyn Resolver>,
    ) -> TestRelay {
        let ca_pem = dir.path().join("ca.pem");
        let relay = Relay::bind(cfg, resolver, &[]).await.expect("relay binds");
        let addr = relay.local_addr();
        let tcp_addr = relay.tcp_addr();
        let core = relay.core().clone();
        let handle = relay.handle();
        let task = tokio::spawn(relay.run());
        TestRelay {
            addr,
            tcp_addr,
            ca_pem,
            token: TEST_TOKEN.to_owned(),
            dir,
            handle,
            core,
            task: Some(task),
        }
    }

    /// Relay URL for clients (`https://localhost:PORT`, or the IP when not on 127.0.0.1).
    pub fn url(&self) -> String {
        match self.addr {
            SocketAddr::V4(a) if a.ip().is_loopback() => format!("https://localhost:{}", a.port()),
            SocketAddr::V6(a) => format!("https://[{}]:{}", a.ip(), a.port()),
            SocketAddr::V4(a) => format!("https://{}:{}", a.ip(), a.port()),
        }
    }

    /// Client settings that trust this relay's dev CA and carry the test token.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.url(), Trust::CaFile(self.ca_pem.clone()));
        c.token = Some(self.token.clone());
        c
    }

    /// Client settings for the TLS/TCP front-end (`https://localhost:TCP_PORT`), trusting the dev
    /// CA and carrying the test token.
    pub fn front_config(&self) -> ClientConfig {
        let tcp = self
            .tcp_addr
            .expect("the relay's TLS/TCP front-end is enabled");
        let mut c = ClientConfig::new(
            format!("https://localhost:{}", tcp.port()),
            Trust::CaFile(self.ca_pem.clone()),
        );
        c.token = Some(self.token.clone());
        c
    }

    /// A client of the TLS/TCP front-end that offers only `version` by ALPN.
    pub async fn front_client(&self, version: FrontVersion) -> FrontClient {
        FrontClient::connect_offering(&self.front_config(), &[version])
            .await
            .unwrap_or_else(|e| panic!("{version} client connects to the test relay: {e}"))
    }

    /// A connected client.
    pub async fn client(&self) -> RelayClient {
        RelayClient::connect(self.client_config())
            .await
            .expect("client connects to the test relay")
    }

    /// The relay's tunnel core (in-process counters such as `requests_seen`).
    pub fn core(&self) -> &Arc<cfr_relay::tunnel::Core> {
        &self.core
    }

    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// Drains (GOAWAY, grace period) and waits for the relay to stop.
    pub async fn stop(mut self) {
        self.handle.shutdown();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), t).await;
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Target helper: `origin.test:PORT`-style targets from an address.
pub fn target(addr: SocketAddr) -> cfr_proto::Target {
    cfr_proto::Target {
        host: cfr_proto::Host::Ip(addr.ip()),
        port: addr.port(),
    }
}

/// Target helper for a name.
pub fn named(name: &str, port: u16) -> cfr_proto::Target {
    cfr_proto::Target {
        host: cfr_proto::Host::Name(name.to_owned()),
        port,
    }
}
