//! End-to-end: the in-repo client through the real relay (QUIC on loopback) to real origins.
use std::sync::Arc;
use std::time::Duration;

use cfr_client::{DatagramMode, RelayClient};
use cfr_proto::ProxyError;
use cfr_testkit::origins::{
    dev_pki, tls_client_roundtrip, PeerEnd, ResettingTcp, TcpEcho, TcpEndWatch, TlsSink, UdpEcho,
};
use cfr_testkit::relay::{named, target, TestRelay, ORIGIN_NAME};
use cfr_testkit::tunnels::{
    assert_echo, lo, refused, retry_until, tcp_roundtrip, udp_roundtrip, LIMIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn tcp_tunnel_echoes_by_ip_and_by_name() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    tcp_roundtrip(&client, &target(echo.addr()), b"hello through cfr").await;
    tcp_roundtrip(&client, &named(ORIGIN_NAME, echo.addr().port()), b"by name").await;
}

#[tokio::test]
async fn tcp_tunnel_half_close_keeps_the_other_direction_open() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let mut tunnel = client.connect_tcp(&target(echo.addr())).await.unwrap();
    let data = vec![7u8; 300_000];
    tunnel.write_all(&data).await.unwrap();
    // FIN towards the destination; its echo of everything must still arrive afterwards.
    tunnel.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(LIMIT, tunnel.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), data.len());
}

#[tokio::test]
async fn udp_tunnel_echoes_with_quic_datagrams() {
    let echo = UdpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let used_quic = udp_roundtrip(
        &client,
        &target(echo.addr()),
        &[b"small".to_vec(), vec![], vec![0xab; 1200]],
    )
    .await;
    assert!(
        used_quic,
        "a client that negotiated HTTP datagrams gets QUIC DATAGRAM frames"
    );
}

#[tokio::test]
async fn udp_tunnel_echoes_with_capsules() {
    let echo = UdpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let mut cfg = relay.client_config();
    cfg.datagrams = DatagramMode::Capsules;
    let client = RelayClient::connect(cfg).await.unwrap();
    let used_quic = udp_roundtrip(
        &client,
        &target(echo.addr()),
        &[b"cap".to_vec(), vec![], vec![0x5a; 1200], vec![1; 9000]],
    )
    .await;
    assert!(!used_quic, "capsule mode must not use QUIC datagrams");
}

#[tokio::test]
async fn udp_tunnel_survives_unknown_context_id() {
    let echo = UdpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let tunnel = client.connect_udp(&target(echo.addr())).await.unwrap();
    tunnel
        .send_unknown_context(7, b"not for the destination")
        .await
        .unwrap();
    tunnel.send(b"after").await.unwrap();
    let got = tokio::time::timeout(LIMIT, tunnel.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], b"after");
    // The unknown-context datagram never reached the destination.
    assert_eq!(echo.count(), 1, "only the context-0 datagram is forwarded");
}

/// A UDP tunnel to a plain loopback socket the test drives itself; the relay and client must
/// outlive the tunnel.
async fn udp_tunnel_to_bare_socket() -> (
    tokio::net::UdpSocket,
    TestRelay,
    RelayClient,
    cfr_client::UdpTunnel,
) {
    let origin = tokio::net::UdpSocket::bind(lo()).await.unwrap();
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let tunnel = client
        .connect_udp(&target(origin.local_addr().unwrap()))
        .await
        .unwrap();
    (origin, relay, client, tunnel)
}

#[tokio::test]
async fn udp_tunnel_keeps_a_burst_of_client_datagrams_apart_and_in_order() {
    // The relay takes client datagrams off the connection in bursts and sends runs of equal size
    // with one GSO sendmsg: each must still reach the destination as its own datagram, in order,
    // and the unknown-context ones in between must be dropped, not sent or merged.
    let (origin, _relay, _client, tunnel) = udp_tunnel_to_bare_socket().await;
    assert!(tunnel.uses_quic_datagrams());
    for i in 0..64u8 {
        tunnel.send(&[i; 1200]).await.unwrap();
        if i % 16 == 15 {
            tunnel.send_unknown_context(7, &[0xee; 1200]).await.unwrap();
        }
    }
    tunnel.send(b"tail").await.unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..64u8 {
        let n = tokio::time::timeout(LIMIT, origin.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("datagram {i} of the burst never arrived"))
            .unwrap();
        assert_eq!(n, 1200, "datagram {i} must keep its own boundary");
        assert!(
            buf[..n].iter().all(|&b| b == i),
            "datagram {i} out of order or mixed with another"
        );
    }
    let n = tokio::time::timeout(LIMIT, origin.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"tail");
}

#[tokio::test]
async fn udp_tunnel_splits_a_gso_train_from_the_destination_into_datagrams() {
    // A destination that answers with one UDP_SEGMENT sendmsg: five 1000-byte datagrams and a
    // 300-byte one. Whether the relay's socket receives them one by one or merged by UDP GRO, the
    // client must get six datagrams with their own boundaries, in order.
    let (origin, _relay, _client, tunnel) = udp_tunnel_to_bare_socket().await;
    tunnel.send(b"go").await.unwrap();
    let mut buf = [0u8; 64];
    let (_, relay_side) = tokio::time::timeout(LIMIT, origin.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let mut train = Vec::new();
    for i in 0..5u8 {
        train.extend_from_slice(&[i; 1000]);
    }
    train.extend_from_slice(&[9u8; 300]);
    let state = quinn_udp::UdpSocketState::new((&origin).into()).unwrap();
    let transmit = quinn_udp::Transmit {
        destination: relay_side,
        ecn: None,
        contents: &train,
        segment_size: Some(1000),
        src_ip: None,
    };
    origin
        .async_io(tokio::io::Interest::WRITABLE, || {
            state.try_send((&origin).into(), &transmit)
        })
        .await
        .unwrap();
    for (fill, len) in [
        (0u8, 1000),
        (1, 1000),
        (2, 1000),
        (3, 1000),
        (4, 1000),
        (9, 300),
    ] {
        let got = tokio::time::timeout(LIMIT, tunnel.recv())
            .await
            .unwrap_or_else(|_| panic!("the {fill:#x} datagram of the train never arrived"))
            .unwrap();
        assert_eq!(got.len(), len, "the {fill:#x} datagram must keep its size");
        assert!(
            got.iter().all(|&b| b == fill),
            "the {fill:#x} datagram is out of order or mixed"
        );
    }
}

#[tokio::test]
async fn inner_tls_passes_byte_exact_both_directions() {
    const UP: u64 = 1_500_000;
    const DOWN: u64 = 1_200_000;
    let sink = TlsSink::start(lo(), DOWN).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let tunnel = client.connect_tcp(&target(sink.addr())).await.unwrap();
    let mine = tls_client_roundtrip(tunnel, "localhost", dev_pki().roots(), UP, DOWN)
        .await
        .expect("TLS through the tunnel");
    let theirs = sink
        .wait_session(0, LIMIT)
        .await
        .expect("server saw a session");
    assert_eq!(theirs.received_len, UP);
    assert_eq!(
        mine.sent_sha256, theirs.received_sha256,
        "client→server plaintext hash"
    );
    assert_eq!(
        mine.received_sha256, theirs.sent_sha256,
        "server→client plaintext hash"
    );
}

#[tokio::test]
async fn hundred_concurrent_tunnels_on_one_connection() {
    let tcp = TcpEcho::start(lo()).await;
    let udp = UdpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = Arc::new(relay.client().await);
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let client = client.clone();
        let (t_tcp, t_udp) = (target(tcp.addr()), target(udp.addr()));
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let msg = format!("tunnel {i}").repeat(100);
                tcp_roundtrip(&client, &t_tcp, msg.as_bytes()).await;
            } else {
                udp_roundtrip(&client, &t_udp, &[format!("dgram {i}").into_bytes()]).await;
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("tunnel finished")
            .expect("tunnel task ok");
    }
}

#[tokio::test]
async fn errors_get_precise_status_and_the_connection_keeps_working() {
    let echo = TcpEcho::start(lo()).await;
    let uecho = UdpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    // A long-lived tunnel that must survive every error below.
    let mut survivor = client.connect_tcp(&target(echo.addr())).await.unwrap();

    // Closed port: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = refused(&client, &target(closed), false).await;
    assert_eq!(
        (e.status().map(|s| s.as_u16()), e.proxy_error()),
        (Some(502), Some(ProxyError::ConnectionRefused))
    );

    // Name that does not resolve.
    let e = refused(&client, &named("nope.test", 80), false).await;
    assert_eq!(
        (e.status().map(|s| s.as_u16()), e.proxy_error()),
        (Some(502), Some(ProxyError::DnsError))
    );
    let e = refused(&client, &named("nope.test", 80), true).await;
    assert_eq!(
        (e.status().map(|s| s.as_u16()), e.proxy_error()),
        (Some(502), Some(ProxyError::DnsError))
    );

    // Forbidden destinations (never dialled: the policy refuses before connecting).
    for forbidden in [
        "10.0.0.1:80",
        "169.254.169.254:80",
        "[fe80::1]:80",
        "224.0.0.1:5353",
    ] {
        let e = refused(&client, &target(forbidden.parse().unwrap()), false).await;
        assert_eq!(
            (e.status().map(|s| s.as_u16()), e.proxy_error()),
            (Some(403), Some(ProxyError::DestinationIpProhibited)),
            "{forbidden}"
        );
    }
    // The relay itself.
    let e = refused(&client, &target(relay.addr), true).await;
    assert_eq!(e.status().map(|s| s.as_u16()), Some(403));

    // Malformed requests sent raw.
    for (authority, path, proto, want) in [
        ("localhost:0", None, None, 400),
        ("localhost:99999", None, None, 400),
        ("[::1%25eth0]:80", None, None, 400),
        (
            "x",
            Some("/.well-known/masque/udp/fe80%3A%3A1%25eth0/443/"),
            Some("connect-udp"),
            400,
        ),
        (
            "x",
            Some("/.well-known/masque/udp/127.0.0.1/0/"),
            Some("connect-udp"),
            400,
        ),
        ("x", Some("/not/the/template"), Some("connect-udp"), 400),
    ] {
        let mut b = http::Request::builder().method(http::Method::CONNECT);
        b = match path {
            Some(p) => b.uri(format!("https://{authority}{p}")),
            None => b.uri(authority),
        };
        let mut req = b.body(()).unwrap();
        if let Some(p) = proto {
            let _ = p;
            req.extensions_mut().insert(h3::ext::Protocol::CONNECT_UDP);
        }
        req.headers_mut().insert(
            http::header::PROXY_AUTHORIZATION,
            format!("Bearer {}", relay.token).parse().unwrap(),
        );
        match client.send_request(req).await {
            Ok(raw) => {
                assert_eq!(raw.response.status().as_u16(), want, "{authority} {path:?}");
                assert!(
                    raw.response.headers().contains_key("proxy-status"),
                    "error responses carry Proxy-Status"
                );
            }
            Err(e) => assert_eq!(
                e.status().map(|s| s.as_u16()),
                Some(want),
                "{authority} {path:?}: {e}"
            ),
        }
    }

    // Unknown :protocol: h3 resets the stream itself; the connection survives (checked below).
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://localhost/{}", "x"))
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h3::ext::Protocol::WEB_TRANSPORT);
    req.headers_mut().insert(
        http::header::PROXY_AUTHORIZATION,
        format!("Bearer {}", relay.token).parse().unwrap(),
    );
    match client.send_request(req).await {
        Ok(raw) => assert_eq!(raw.response.status().as_u16(), 501),
        Err(e) => assert!(
            e.status().is_none_or(|s| s.as_u16() == 501),
            "unexpected {e}"
        ),
    }

    // Non-CONNECT methods.
    let mut req = http::Request::builder()
        .method(http::Method::GET)
        .uri("https://localhost/")
        .body(())
        .unwrap();
    req.headers_mut().insert(
        http::header::PROXY_AUTHORIZATION,
        format!("Bearer {}", relay.token).parse().unwrap(),
    );
    let raw = client.send_request(req).await;
    match raw {
        Ok(raw) => assert_eq!(raw.response.status().as_u16(), 405),
        Err(e) => assert_eq!(e.status().map(|s| s.as_u16()), Some(405)),
    }

    // After all of that: new tunnels work, and the old one still echoes.
    tcp_roundtrip(&client, &target(echo.addr()), b"still alive").await;
    udp_roundtrip(&client, &target(uecho.addr()), &[b"still alive".to_vec()]).await;
    survivor.write_all(b"survivor").await.unwrap();
    let mut buf = [0u8; 8];
    tokio::time::timeout(LIMIT, survivor.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"survivor");
}

#[tokio::test]
async fn dns_timeout_is_504() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cfr_testkit::relay::test_config(dir.path());
    cfg.timeouts.dns_secs = 1;
    let relay =
        TestRelay::start_with_resolver(dir, cfg, Arc::new(cfr_relay::resolve::NeverResolves)).await;
    let client = relay.client().await;
    let e = refused(&client, &named("slow.test", 443), false).await;
    assert_eq!(
        (e.status().map(|s| s.as_u16()), e.proxy_error()),
        (Some(504), Some(ProxyError::DnsTimeout))
    );
    let echo = TcpEcho::start(lo()).await;
    tcp_roundtrip(&client, &target(echo.addr()), b"literal still works").await;
}

#[tokio::test]
async fn missing_or_wrong_token_is_407_with_no_upstream_activity() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start().await;
    for token in [None, Some("wrong".to_owned())] {
        let mut cfg = relay.client_config();
        cfg.token = token.clone();
        let client = RelayClient::connect(cfg).await.unwrap();
        let e = refused(&client, &target(echo.addr()), false).await;
        assert_eq!(e.status().map(|s| s.as_u16()), Some(407), "token {token:?}");
        assert_eq!(e.proxy_error(), Some(ProxyError::HttpRequestDenied));
        let e = refused(&client, &target(echo.addr()), true).await;
        assert_eq!(e.status().map(|s| s.as_u16()), Some(407));
    }
    assert!(
        echo.peers().is_empty(),
        "an unauthenticated request must not reach the destination"
    );
    let client = relay.client().await;
    tcp_roundtrip(&client, &target(echo.addr()), b"authorised").await;
    assert_eq!(echo.peers().len(), 1);
}

#[tokio::test]
async fn target_reset_resets_the_client_stream() {
    let dest = ResettingTcp::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let mut tunnel = client.connect_tcp(&target(dest.addr())).await.unwrap();
    // The destination resets once these bytes arrive, i.e. after the 2xx.
    tunnel.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    let res = tokio::time::timeout(LIMIT, tunnel.read(&mut buf))
        .await
        .unwrap();
    let err = res.expect_err("a destination reset must reset the tunnel, not end it cleanly");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    // RFC 9114 §4.4: the relay also stops the client's sending side with H3_CONNECT_ERROR.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let stopped = loop {
        let wrote = async {
            tunnel.write_all(b"more").await?;
            tunnel.flush().await
        };
        match tokio::time::timeout_at(deadline, wrote).await {
            Ok(Err(e)) => break e.to_string(),
            Ok(Ok(())) => tokio::task::yield_now().await,
            Err(_) => panic!("writes kept succeeding after the destination reset"),
        }
    };
    assert!(
        stopped.contains("H3_CONNECT_ERROR"),
        "writes after the reset fail with the relay's STOP_SENDING code: {stopped}"
    );
}

#[tokio::test]
async fn client_reset_aborts_the_destination_connection() {
    let dest = TcpEndWatch::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let mut tunnel = client.connect_tcp(&target(dest.addr())).await.unwrap();
    tunnel.write_all(b"partial").await.unwrap();
    tunnel.flush().await.unwrap();
    // A reset discards data not yet delivered: reset only once the bytes are at the destination.
    dest.received_at_least(7, LIMIT).await;
    drop(tunnel); // dropped without shutdown: stream reset
    let (outcome, data) = dest.end(LIMIT).await;
    assert_eq!(data, b"partial");
    assert_eq!(
        outcome,
        PeerEnd::Reset,
        "client reset must abort the TCP connection with RST, not FIN"
    );
}

#[tokio::test]
async fn dropping_a_tunnel_that_never_wrote_aborts_the_destination_connection() {
    // The client starts its write pump only at the first write: an unused tunnel is reset by the
    // drop itself.
    let dest = TcpEndWatch::start(lo()).await;
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let tunnel = client.connect_tcp(&target(dest.addr())).await.unwrap();
    drop(tunnel);
    let (outcome, data) = dest.end(LIMIT).await;
    assert!(data.is_empty(), "nothing was written, got {data:?}");
    assert_eq!(
        outcome,
        PeerEnd::Reset,
        "dropping an unused tunnel must abort the TCP connection with RST, not FIN"
    );
}

#[tokio::test]
async fn tunnel_limits_answer_503_and_free_up() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.limits.tunnels_per_connection = 2).await;
    let client = relay.client().await;
    let a = client.connect_tcp(&target(echo.addr())).await.unwrap();
    let _b = client.connect_tcp(&target(echo.addr())).await.unwrap();
    let e = refused(&client, &target(echo.addr()), false).await;
    assert_eq!(
        (e.status().map(|s| s.as_u16()), e.proxy_error()),
        (Some(503), Some(ProxyError::ConnectionLimitReached))
    );
    // Another connection has its own budget.
    let other = relay.client().await;
    tcp_roundtrip(&other, &target(echo.addr()), b"other client").await;
    drop(a);
    // The relay frees the slot when it processes the reset: ask until it has.
    let echo_target = target(echo.addr());
    let mut t = retry_until("a freed tunnel slot", LIMIT, || {
        client.connect_tcp(&echo_target)
    })
    .await;
    assert_echo(&mut t, b"slot freed").await;
}

#[tokio::test]
async fn dropping_client_right_after_shutdown_still_delivers_every_byte() {
    use cfr_testkit::origins::RecordingTcp;
    const LEN: usize = 8 << 20;
    let sink = RecordingTcp::start(lo(), &b""[..]).await;
    let relay = TestRelay::start().await;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
    {
        let client = relay.client().await;
        let mut t = client.connect_tcp(&target(sink.addr())).await.unwrap();
        t.write_all(&data).await.unwrap();
        t.shutdown().await.unwrap();
        // Tunnel and client (the last handles of the QUIC connection) dropped here, while data
        // may still be in flight.
    }
    let rec = sink
        .wait_recording(0, LEN, LIMIT)
        .await
        .expect("the destination received the upload");
    assert_eq!(
        rec.bytes.len(),
        LEN,
        "every byte written before shutdown must arrive"
    );
    assert!(rec.bytes == data, "bytes arrive unchanged");
}

#[tokio::test]
async fn a_request_stream_without_complete_headers_is_closed_after_the_handshake_timeout() {
    let echo = TcpEcho::start(lo()).await;
    let relay = TestRelay::start_with(|c| c.timeouts.handshake_secs = 1).await;
    let client = relay.client().await;
    // Borrow the client's QUIC connection through a raw (refused) request.
    let req = http::Request::builder()
        .method(http::Method::GET)
        .uri("https://localhost/")
        .body(())
        .unwrap();
    let raw = client.send_request(req).await.unwrap();
    // A bidirectional (request) stream with the start of a HEADERS frame (type 0x01, length 16)
    // and nothing more: RFC 9114 §10.5 lets the relay bound how long it waits for the rest.
    let (mut send, mut recv) = raw.quic.open_bi().await.unwrap();
    send.write_all(&[0x01, 0x10]).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16)).await;
    assert!(
        ended.is_ok(),
        "the relay must give up on a stalled request head, not hold the stream"
    );
    // RFC 9114 §4.1.1: the response side is reset with H3_REQUEST_INCOMPLETE (0x10d), and the
    // request side is stopped with the same code (not quinn's default 0).
    let incomplete = quinn::VarInt::from_u32(0x10d);
    assert!(
        matches!(ended, Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c)))) if c == incomplete),
        "the response stream is reset with H3_REQUEST_INCOMPLETE: {ended:?}"
    );
    let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
        .await
        .expect("the relay must stop the request side too");
    assert_eq!(
        stopped.ok().flatten(),
        Some(incomplete),
        "STOP_SENDING carries H3_REQUEST_INCOMPLETE"
    );
    // The connection itself is fine.
    tcp_roundtrip(&client, &target(echo.addr()), b"after stalled stream").await;
}

/// RFC 9297 §2.1: a QUIC DATAGRAM frame too short to hold its quarter stream ID is a connection
/// error H3_DATAGRAM_ERROR (0x33), not a datagram to drop.
#[tokio::test]
async fn a_truncated_quarter_stream_id_closes_the_connection_with_h3_datagram_error() {
    let relay = TestRelay::start().await;
    let client = relay.client().await;
    let req = http::Request::builder()
        .method(http::Method::GET)
        .uri("https://localhost/")
        .body(())
        .unwrap();
    let raw = client.send_request(req).await.unwrap();
    // 0x40 announces a two-byte varint; the frame ends after its first byte.
    raw.quic
        .send_datagram(bytes::Bytes::from_static(&[0x40]))
        .expect("the relay advertises max_datagram_frame_size");
    let closed = tokio::time::timeout(LIMIT, raw.quic.closed())
        .await
        .expect("the relay must close the connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            close.error_code,
            quinn::VarInt::from_u32(0x33),
            "closed with {close:?}, want H3_DATAGRAM_ERROR"
        ),
        other => panic!("want an application close with H3_DATAGRAM_ERROR, got {other:?}"),
    }
}
