//! Relay discovery through a Provisioning Domain (draft-ietf-intarea-proxy-config-14): the relay
//! serves its PvD on every front-end, accepts CONNECT-UDP at its configured template, and the
//! client's `Discovery` spreads tunnels over the relays a PvD lists, fails over, and stops using
//! a PvD once it has expired.
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use cfr_client::discover::{self, Discovery, PvdLocation, ALPN_H2, ALPN_HTTP11};
use cfr_client::select::Policy;
use cfr_client::{ClientConfig, ClientError, RelayClient, Trust, TunnelOpener};
use cfr_proto::pvd;
use cfr_relay::config::{PvdProxyConfig, RelayConfig};
use cfr_testkit::origins::{TcpEcho, UdpEcho};
use cfr_testkit::relay::{target, TestRelay};
use cfr_testkit::tunnels::{lo, udp_echo, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEMPLATE: &str = "/masque/udp/{target_host},{target_port}";

fn with_pvd(cfg: &mut RelayConfig) {
    cfg.pvd.identifier = Some("localhost".into());
    cfg.connect_udp_template = TEMPLATE.into();
}

fn location(relay: &TestRelay) -> PvdLocation {
    PvdLocation::parse(&format!("localhost:{}", relay.addr.port())).unwrap()
}

/// The PvD over HTTP/3, without credentials.
async fn fetch_h3(relay: &TestRelay) -> (http::Response<()>, Vec<u8>) {
    let mut cfg = relay.client_config();
    cfg.token = None;
    let client = RelayClient::connect(cfg).await.expect("h3 connection");
    let req = http::Request::get(format!(
        "https://localhost:{}{}",
        relay.addr.port(),
        pvd::WELL_KNOWN_PATH
    ))
    .header("accept", pvd::MEDIA_TYPE)
    .body(())
    .unwrap();
    let mut raw = client.send_request(req).await.expect("GET over h3");
    let mut body = Vec::new();
    while let Some(mut chunk) = tokio::time::timeout(LIMIT, raw.stream.recv_data())
        .await
        .expect("body within the limit")
        .expect("body")
    {
        use bytes::Buf;
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    (raw.response, body)
}

fn untrusted_base(relay: &TestRelay) -> ClientConfig {
    let mut c = relay.client_config();
    c.token = None;
    c
}

#[tokio::test]
async fn pvd_is_byte_identical_on_h3_h2_and_h1_and_names_the_relay() {
    let relay = TestRelay::start_with(with_pvd).await;
    let (h3_head, h3_body) = fetch_h3(&relay).await;
    let base = untrusted_base(&relay);
    let loc = location(&relay);
    let (h2_head, h2_body) = discover::fetch(&loc, &base, &[ALPN_H2]).await.unwrap();
    let (h1_head, h1_body) = discover::fetch(&loc, &base, &[ALPN_HTTP11]).await.unwrap();
    assert_eq!(h3_head.status(), 200);
    assert_eq!(
        (h2_head.status.as_u16(), h1_head.status.as_u16()),
        (200, 200)
    );
    assert_eq!(h2_head.version, http::Version::HTTP_2);
    assert_eq!(h1_head.version, http::Version::HTTP_11);
    assert_eq!(h3_body, h2_body.to_vec(), "HTTP/3 and HTTP/2 bodies differ");
    assert_eq!(
        h3_body,
        h1_body.to_vec(),
        "HTTP/3 and HTTP/1.1 bodies differ"
    );
    for headers in [h3_head.headers(), &h2_head.headers, &h1_head.headers] {
        assert_eq!(headers["content-type"], pvd::MEDIA_TYPE);
        let cc = headers["cache-control"].to_str().unwrap();
        let max_age: u64 = cc.strip_prefix("max-age=").unwrap().parse().unwrap();
        assert!((1795..=3600).contains(&max_age), "{cc}");
    }
    let doc = pvd::parse(&h3_body).unwrap();
    doc.check("localhost", SystemTime::now()).unwrap();
    let left = doc.expires_at().duration_since(SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(1795), "expires {left:?} ahead");
    assert!(doc.prefixes.is_empty());
    let port = relay.addr.port();
    let udp = &doc.proxies[0];
    assert_eq!(udp.protocol, "connect-udp");
    assert_eq!(udp.proxy, format!("https://localhost:{port}{TEMPLATE}"));
    assert_eq!(udp.alpn, ["h3", "h2", "http/1.1"]);
    assert_eq!(doc.proxies[1].protocol, "https-connect");
    assert_eq!(doc.proxies[1].proxy, format!("localhost:{port}"));
    // Nothing about clients, and no credentials were needed.
    let text = String::from_utf8(h3_body).unwrap();
    assert!(!text.contains("127.0.0.1"), "{text}");

    // Any other plain GET is refused as before (405, Allow: CONNECT).
    let mut cfg = relay.client_config();
    cfg.token = None;
    let client = RelayClient::connect(cfg).await.unwrap();
    let other = http::Request::get(format!("https://localhost:{port}/.well-known/pvdx"))
        .body(())
        .unwrap();
    let raw = client.send_request(other).await.unwrap();
    assert_ne!(raw.response.status(), 200);
    assert!(
        raw.response.status().is_client_error(),
        "{}",
        raw.response.status()
    );
}

#[tokio::test]
async fn relay_without_identifier_serves_no_pvd() {
    let relay = TestRelay::start().await;
    let err = discover::fetch(&location(&relay), &untrusted_base(&relay), &[ALPN_H2])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no PvD there"), "{err}");
}

#[tokio::test]
async fn connect_udp_is_accepted_only_at_the_configured_template() {
    let relay = TestRelay::start_with(with_pvd).await;
    let echo = UdpEcho::start(lo()).await;
    let d = Discovery::start(location(&relay), relay.client_config(), Policy::Random)
        .await
        .unwrap();
    let t = target(echo.addr());
    let tunnel = tokio::time::timeout(LIMIT, d.connect_udp(&t))
        .await
        .unwrap()
        .expect("UDP tunnel at the PvD's template");
    udp_echo(&tunnel, b"template", 5, Duration::from_secs(2)).await;
    // The RFC 9298 default path is not this relay's template.
    let client = relay.client().await;
    let err = match client.connect_udp(&t).await {
        Ok(_) => panic!("CONNECT-UDP at the default path must be refused"),
        Err(e) => e,
    };
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST), "{err}");
}

/// Relays `a`, `b` and `c` share one certificate (one CA for the client, in the returned
/// directory); `a` serves the PvD listing all three.
async fn three_relays(expires_secs: u64) -> (TestRelay, TestRelay, TestRelay, tempfile::TempDir) {
    let a_dir = tempfile::tempdir().unwrap();
    let pki = cfr_relay::tls::generate_dev_pki(a_dir.path(), &[]).unwrap();
    let same_cert = |cfg: &mut RelayConfig| {
        cfg.cert = pki.server_cert.clone();
        cfg.key = pki.server_key.clone();
    };
    let b = TestRelay::start_with(same_cert).await;
    let c = TestRelay::start_with(same_cert).await;
    let others = [&b, &c].map(|r| PvdProxyConfig {
        protocol: "https-connect".into(),
        proxy: format!("localhost:{}", r.addr.port()),
        alpn: vec!["h3".into()],
        identifier: None,
    });
    let mut a = TestRelay::start_with(|cfg| {
        same_cert(cfg);
        with_pvd(cfg);
        cfg.pvd.expires_secs = expires_secs;
        cfg.pvd.proxies = others.to_vec();
    })
    .await;
    a.ca_pem = pki.ca_cert.clone();
    (a, b, c, a_dir)
}

/// A `Discovery` of `a`'s PvD with the shared CA and the test token.
async fn discover_via(a: &TestRelay, policy: Policy) -> Discovery {
    let mut base = ClientConfig::new("https://unused", Trust::CaFile(a.ca_pem.clone()));
    base.token = Some(a.token.clone());
    base.connect_timeout = Duration::from_secs(2);
    Discovery::start(location(a), base, policy)
        .await
        .expect("discovery from the PvD of relay a")
}

async fn tcp_echo_via(d: &Discovery, echo: &TcpEcho) -> Result<(), ClientError> {
    let mut tunnel = tokio::time::timeout(LIMIT, d.connect_tcp(&target(echo.addr())))
        .await
        .expect("tunnel answer within the limit")?;
    tunnel.write_all(b"pvd").await?;
    tunnel.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(LIMIT, tunnel.read_to_end(&mut back))
        .await
        .expect("echo within the limit")?;
    assert_eq!(back, b"pvd");
    Ok(())
}

#[tokio::test]
async fn discovered_relays_share_tunnels_and_fail_over() {
    let (a, b, c, _pki) = three_relays(3600).await;
    let echo = TcpEcho::start(lo()).await;
    let d = discover_via(&a, Policy::Random).await;
    let (tcp, udp) = d.relays();
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    assert_eq!(udp.len(), 1, "only a lists a connect-udp template: {udp:?}");
    for _ in 0..30 {
        tcp_echo_via(&d, &echo).await.unwrap();
    }
    let seen = [&a, &b, &c].map(|r| r.core().requests_seen("h3"));
    assert!(seen.iter().all(|&n| n > 0), "tunnels per relay: {seen:?}");

    c.stop().await;
    for i in 0..10 {
        tcp_echo_via(&d, &echo)
            .await
            .unwrap_or_else(|e| panic!("tunnel {i} after relay c stopped: {e}"));
    }
    let after = [&a, &b].map(|r| r.core().requests_seen("h3"));
    assert_eq!(
        after[0] + after[1] - seen[0] - seen[1],
        10,
        "every new tunnel went to a or b"
    );
}

#[tokio::test]
async fn pvd_host_down_keeps_the_last_good_set_until_expires_then_no_relay() {
    let (a, b, _c, _pki) = three_relays(4).await;
    let echo = TcpEcho::start(lo()).await;
    let d = discover_via(&a, Policy::Ordered).await;
    let expires = d.expires().unwrap();
    // The PvD host goes away: its listeners close at once (the drain keeps `a` alive meanwhile).
    a.handle().shutdown();
    let stopped = SystemTime::now();
    assert!(
        stopped < expires,
        "the PvD must still be valid when its host goes away"
    );
    // Tunnels keep working through the relays of the last good PvD (a is down: b takes them).
    tcp_echo_via(&d, &echo)
        .await
        .expect("tunnel through the last good relay set");
    let b_before = b.core().requests_seen("h3");
    let deadline = Instant::now() + LIMIT;
    let mut ok_after_failed_refresh = 0;
    let err = loop {
        assert!(Instant::now() < deadline, "the PvD never expired");
        let failures_before = d.refresh_failures();
        match tcp_echo_via(&d, &echo).await {
            Ok(()) if failures_before > 0 => ok_after_failed_refresh += 1,
            Ok(()) => {}
            Err(e) => break e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(SystemTime::now() >= expires, "failed before expiry: {err}");
    assert!(
        matches!(err, ClientError::NoRelay(_)) && err.to_string().contains("expired"),
        "{err}"
    );
    assert!(
        d.refresh_failures() > 0,
        "a refresh must have been tried and failed"
    );
    assert!(b.core().requests_seen("h3") > b_before);
    eprintln!("tunnels after a failed refresh, before expiry: {ok_after_failed_refresh}");
    assert!(d.expires().is_none(), "the expired relay set is dropped");
}

/// An HTTPS/1.1 server (the relay's dev certificate) that answers every request with `body`.
async fn static_pvd_server(cert: &Path, key: &Path, body: Bytes) -> std::net::SocketAddr {
    let tls = cfr_relay::tls::server_config(cert, key, None, &[b"http/1.1"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", pvd::MEDIA_TYPE)
                                .body(http_body_util::Full::new(body))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn bad_pvds_are_rejected_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let pki = cfr_relay::tls::generate_dev_pki(dir.path(), &[]).unwrap();
    let base = ClientConfig::new("https://unused", Trust::CaFile(pki.ca_cert.clone()));
    let huge = format!(
        r#"{{"identifier":"localhost","expires":"2099-01-01T00:00:00Z","prefixes":[],"x":"{}"}}"#,
        "a".repeat(pvd::MAX_LEN)
    );
    let cases: [(String, &str); 7] = [
        (huge, "at most 64 KiB"),
        (
            r#"{"identifier":"localhost","expires":"2099-01-01T00:00:00Z","prefixes":[],
               "proxies":[{"protocol":"connect-udp","proxy":"https://localhost/{target_host}/{target_port}",
                           "mandatory":["example_auth"],"example_auth":"x"}]}"#.into(),
            "example_auth",
        ),
        (
            r#"{"identifier":"localhost","expires":"2001-01-01T00:00:00Z","prefixes":[],
               "proxies":[{"protocol":"https-connect","proxy":"localhost:1"}]}"#.into(),
            "expired at 2001-01-01T00:00:00Z",
        ),
        (
            r#"{"identifier":"proxy.example.org","expires":"2099-01-01T00:00:00Z","prefixes":[]}"#.into(),
            "does not match the host",
        ),
        (
            r#"{"identifier":"localhost","prefixes":[]}"#.into(),
            "missing field `expires`",
        ),
        (
            r#"{"identifier":"localhost","expires":"2099-01-01T00:00:00Z","prefixes":[],"proxies":"many"}"#.into(),
            "invalid type",
        ),
        ("<html>not json</html>".into(), "malformed PvD"),
    ];
    for (body, expect) in cases {
        let addr =
            static_pvd_server(&pki.server_cert, &pki.server_key, Bytes::from(body.clone())).await;
        let loc = PvdLocation::parse(&format!("localhost:{}", addr.port())).unwrap();
        let err = match Discovery::start(loc, base.clone(), Policy::Random).await {
            Ok(_) => panic!("PvD accepted: {body}"),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(msg.contains(expect), "expected {expect:?} in: {msg}");
        assert!(matches!(err, ClientError::Discovery(_)), "{err:?}");
    }
}
