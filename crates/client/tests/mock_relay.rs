//! The client against a tiny in-process HTTP/3 echo "relay" on loopback (the real relay is tested
//! from crates/testkit). The mock answers every CONNECT with 200 and echoes the request body
//! byte-for-byte (so capsules come back as capsules) and echoes QUIC datagrams unchanged; it
//! counts what arrived in which encoding, so tests observe the wire format, not the client's flag.
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use cfr_client::{ClientConfig, ClientError, DatagramMode, RelayClient, Trust};
use cfr_proto::{Host, ProxyError, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Mock {
    addr: SocketAddr,
    cert_der: Vec<u8>,
    conns: Arc<Mutex<Vec<quinn::Connection>>>,
    seen: Arc<Seen>,
    _endpoint: quinn::Endpoint,
}

/// What the mock received for connect-udp tunnels.
#[derive(Default)]
struct Seen {
    /// QUIC DATAGRAM frames.
    quic_datagrams: AtomicU64,
    /// Request-stream bytes of extended CONNECT (connect-udp) requests, i.e. capsules.
    capsule_bytes: AtomicU64,
}

fn mock(datagrams: bool) -> Mock {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_der = cert.cert.der().to_vec();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.datagram_receive_buffer_size(datagrams.then_some(1 << 20));
    server.transport_config(Arc::new(transport));
    let endpoint =
        quinn::Endpoint::server(server, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let conns = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Seen::default());
    let ep = endpoint.clone();
    let list = conns.clone();
    let counters = seen.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let list = list.clone();
            let seen = counters.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                list.lock().unwrap().push(conn.clone());
                serve_conn(conn, datagrams, seen).await;
            });
        }
    });
    Mock {
        addr,
        cert_der,
        conns,
        seen,
        _endpoint: endpoint,
    }
}

async fn serve_conn(conn: quinn::Connection, datagrams: bool, seen: Arc<Seen>) {
    let Ok(mut h3) = h3::server::builder()
        .enable_extended_connect(true)
        .enable_datagram(datagrams)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await
    else {
        return;
    };
    if datagrams {
        let c = conn.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(d) = c.read_datagram().await {
                seen.quic_datagrams.fetch_add(1, Ordering::Relaxed);
                let _ = c.send_datagram(d);
            }
        });
    }
    while let Ok(Some(resolver)) = h3.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok((req, mut stream)) = resolver.resolve_request().await else {
                return;
            };
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if authority == "denied.example:443" {
                let resp = http::Response::builder()
                    .status(403)
                    .header("proxy-status", "cfr; error=destination_ip_prohibited")
                    .body(())
                    .unwrap();
                let _ = stream.send_response(resp).await;
                let _ = stream.finish().await;
                return;
            }
            let mut resp = http::Response::builder().status(200);
            let connect_udp = req.extensions().get::<h3::ext::Protocol>().is_some();
            if connect_udp {
                resp = resp.header("capsule-protocol", "?1");
            }
            if stream.send_response(resp.body(()).unwrap()).await.is_err() {
                return;
            }
            if authority == "reset.example:443" {
                // A reset discards unread stream data, headers included: reset only once the
                // client's first bytes show it has read the response.
                let _ = stream.recv_data().await;
                stream.stop_stream(h3::error::Code::H3_CONNECT_ERROR);
                return;
            }
            while let Ok(Some(mut d)) = stream.recv_data().await {
                let b = d.copy_to_bytes(d.remaining());
                if connect_udp {
                    seen.capsule_bytes
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                if stream.send_data(b).await.is_err() {
                    return;
                }
            }
            let _ = stream.finish().await;
        });
    }
}

fn config(m: &Mock, mode: DatagramMode) -> ClientConfig {
    let mut cfg = ClientConfig::new(
        format!("https://127.0.0.1:{}", m.addr.port()),
        Trust::PinnedCertDer(m.cert_der.clone()),
    );
    cfg.datagrams = mode;
    cfg.connect_timeout = Duration::from_secs(5);
    cfg
}

/// The mock plus a client connected to it.
async fn connected(m: Mock, mode: DatagramMode) -> (Mock, RelayClient) {
    let client = RelayClient::connect(config(&m, mode)).await.unwrap();
    (m, client)
}

/// A loopback listener for a local proxy, and its address.
async fn local_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn target(host: &str, port: u16) -> Target {
    Target {
        host: Host::Name(host.into()),
        port,
    }
}

#[tokio::test]
async fn tcp_tunnel_echoes_and_half_close_keeps_reading() {
    let (_m, client) = connected(mock(true), DatagramMode::Auto).await;
    let mut t = client
        .connect_tcp(&target("echo.example", 443))
        .await
        .unwrap();
    let payload = vec![7u8; 300_000];
    t.write_all(&payload).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert_eq!(
        back.len(),
        payload.len(),
        "echo after FIN must return every byte"
    );
    assert!(back == payload);
}

#[tokio::test]
async fn tcp_tunnel_relay_reset_is_connection_reset() {
    let (_m, client) = connected(mock(true), DatagramMode::Auto).await;
    let mut t = client
        .connect_tcp(&target("reset.example", 443))
        .await
        .unwrap();
    t.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    let err = t
        .read(&mut buf)
        .await
        .expect_err("reset stream must fail the read");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn refused_tunnel_carries_status_and_proxy_status() {
    let (_m, client) = connected(mock(true), DatagramMode::Auto).await;
    match client.connect_tcp(&target("denied.example", 443)).await {
        Err(e @ ClientError::Refused { .. }) => {
            assert_eq!(e.status().map(|s| s.as_u16()), Some(403));
            assert_eq!(e.proxy_error(), Some(ProxyError::DestinationIpProhibited));
        }
        Err(e) => panic!("expected Refused, got {e}"),
        Ok(_) => panic!("expected Refused, got a tunnel"),
    }
}

/// Echoes through a connect-udp tunnel and checks, at the mock, which encoding carried the
/// small payloads: QUIC DATAGRAM frames when `expect_quic`, otherwise DATAGRAM capsules only.
async fn udp_echo(m: &Mock, client: &RelayClient, expect_quic: bool) {
    let t = client
        .connect_udp(&target("dns.example", 53))
        .await
        .unwrap();
    assert_eq!(t.uses_quic_datagrams(), expect_quic);
    t.send(b"ping").await.unwrap();
    assert_eq!(&t.recv().await.unwrap()[..], b"ping");
    // An unknown context ID is dropped by the receiver (here: our own dispatcher on the echo).
    t.send_unknown_context(7, b"ignored").await.unwrap();
    t.send(b"").await.unwrap();
    assert_eq!(
        t.recv().await.unwrap().len(),
        0,
        "empty UDP payload is a datagram"
    );
    // The echoes came back, so the mock has received all three small datagrams.
    let quic = m.seen.quic_datagrams.load(Ordering::Relaxed);
    let capsule_bytes = m.seen.capsule_bytes.load(Ordering::Relaxed);
    // Each DATAGRAM capsule here is type (1) + length (1) + context ID (1) + payload.
    let small_as_capsules = (3 + 4) + (3 + 7) + 3;
    if expect_quic {
        assert_eq!(quic, 3, "the three small payloads travel as QUIC datagrams");
        assert_eq!(capsule_bytes, 0, "no capsule on the stream");
    } else {
        assert_eq!(quic, 0, "no QUIC datagram in capsule mode");
        assert_eq!(
            capsule_bytes, small_as_capsules,
            "the three small payloads travel as DATAGRAM capsules"
        );
    }
    // Too large for one QUIC datagram: falls back to a capsule and still arrives.
    let big = vec![1u8; 3000];
    t.send(&big).await.unwrap();
    assert_eq!(t.recv().await.unwrap().len(), big.len());
}

#[tokio::test]
async fn udp_tunnel_uses_quic_datagrams_when_negotiated() {
    let (m, client) = connected(mock(true), DatagramMode::Auto).await;
    udp_echo(&m, &client, true).await;
}

#[tokio::test]
async fn udp_tunnel_capsule_mode_sends_capsules() {
    let (m, client) = connected(mock(true), DatagramMode::Capsules).await;
    udp_echo(&m, &client, false).await;
}

#[tokio::test]
async fn udp_tunnel_falls_back_to_capsules_without_relay_datagrams() {
    let (m, client) = connected(mock(false), DatagramMode::Auto).await;
    udp_echo(&m, &client, false).await;
}

#[tokio::test]
async fn new_tunnel_reconnects_after_relay_closed_connection() {
    let (m, client) = connected(mock(true), DatagramMode::Auto).await;
    drop(
        client
            .connect_tcp(&target("echo.example", 443))
            .await
            .unwrap(),
    );
    for c in m.conns.lock().unwrap().drain(..) {
        c.close(0u32.into(), b"bye");
    }
    tokio::time::timeout(Duration::from_secs(10), client.closed())
        .await
        .expect("the client sees the relay's CONNECTION_CLOSE");
    let mut t = client
        .connect_tcp(&target("echo.example", 443))
        .await
        .unwrap();
    t.write_all(b"again").await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"again");
}

#[tokio::test]
async fn local_socks5_connect_reaches_tunnel() {
    let (_m, client) = connected(mock(true), DatagramMode::Auto).await;
    let (listener, laddr) = local_listener().await;
    tokio::spawn(cfr_client::local::socks5::serve(
        listener,
        client,
        Some(("u".into(), "p".into())),
    ));
    let mut s = tokio::net::TcpStream::connect(laddr).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await.unwrap();
    assert_eq!(two, [5, 2]);
    s.write_all(&[1, 1, b'u', 1, b'p']).await.unwrap();
    s.read_exact(&mut two).await.unwrap();
    assert_eq!(two, [1, 0]);
    let mut req = vec![5, 1, 0, 3, 12];
    req.extend_from_slice(b"echo.example");
    req.extend_from_slice(&443u16.to_be_bytes());
    req.extend_from_slice(b"early");
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 0, "SOCKS5 reply must be succeeded");
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"early");

    // Refused destination → "connection not allowed" (0x02).
    let mut s = tokio::net::TcpStream::connect(laddr).await.unwrap();
    s.write_all(&[5, 1, 2, 1, 1, b'u', 1, b'p']).await.unwrap();
    let mut four = [0u8; 4];
    s.read_exact(&mut four).await.unwrap();
    let mut req = vec![5, 1, 0, 3, 14];
    req.extend_from_slice(b"denied.example");
    req.extend_from_slice(&443u16.to_be_bytes());
    s.write_all(&req).await.unwrap();
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 2);
}

#[tokio::test]
async fn local_http_proxy_connect_and_501() {
    let (_m, client) = connected(mock(true), DatagramMode::Auto).await;
    let (listener, laddr) = local_listener().await;
    tokio::spawn(cfr_client::local::http_proxy::serve(listener, client));

    let mut s = tokio::net::TcpStream::connect(laddr).await.unwrap();
    s.write_all(b"CONNECT echo.example:443 HTTP/1.1\r\nHost: echo.example:443\r\n\r\nhi")
        .await
        .unwrap();
    let expect = b"HTTP/1.1 200 Connection established\r\n\r\n";
    let mut head = vec![0u8; expect.len()];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..], expect);
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hi");

    let mut s = tokio::net::TcpStream::connect(laddr).await.unwrap();
    s.write_all(b"CONNECT denied.example:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("destination_ip_prohibited"), "{resp}");

    let mut s = tokio::net::TcpStream::connect(laddr).await.unwrap();
    s.write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 501"), "{resp}");
}
