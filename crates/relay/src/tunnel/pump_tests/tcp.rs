//! The TCP pump: half-close, resets each way, back-pressure, idle timeout.
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::tunnel::pump::TunnelOutcome;

#[tokio::test]
async fn tcp_client_fin_half_closes_and_the_other_direction_keeps_flowing() {
    let mut t = start_tcp(Arc::new(core(|_| {})), OPEN).await;

    t.from_client
        .send(Ok(Some(Bytes::from_static(b"ping"))))
        .unwrap();
    t.from_client.send(Ok(None)).unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, t.dest.read_to_end(&mut got))
        .await
        .expect("the client's FIN must reach the destination as a TCP FIN")
        .unwrap();
    assert_eq!(got, b"ping");

    // Half-closed, not closed: the destination can still answer.
    t.dest.write_all(b"pong").await.unwrap();
    t.client
        .wait_for("the answer after a half-close", |v| v.received == b"pong")
        .await;
    t.dest.shutdown().await.unwrap();
    let stats = t.stats().await;
    assert_eq!(stats.outcome, TunnelOutcome::Closed);
    assert_eq!((stats.bytes_up, stats.bytes_down), (4, 4));
    let v = t.client.view.lock().unwrap();
    assert!(
        v.finished && v.reset.is_none(),
        "a clean end is a FIN, not a reset"
    );
}

#[tokio::test]
async fn tcp_destination_reset_resets_the_client_stream_with_connect_error() {
    let Running {
        mut pump,
        dest,
        client,
        ..
    } = start_tcp(Arc::new(core(|_| {})), OPEN).await;

    // Linger 0: closing sends RST instead of FIN.
    socket2::SockRef::from(&dest)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(dest);
    let stats = ended(&mut pump).await;
    assert_eq!(stats.outcome, TunnelOutcome::TargetReset);
    let v = client.view.lock().unwrap();
    assert_eq!(v.reset, Some(Abort::ConnectError));
    assert_eq!(v.stopped, Some(Abort::ConnectError));
    assert!(
        !v.finished,
        "a reset destination must not look like a clean FIN"
    );
}

#[tokio::test]
async fn tcp_client_reset_aborts_the_destination_with_rst() {
    let mut t = start_tcp(Arc::new(core(|_| {})), OPEN).await;

    t.from_client
        .send(Ok(Some(Bytes::from_static(b"partial"))))
        .unwrap();
    t.from_client
        .send(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
        .unwrap();
    let stats = t.stats().await;
    assert_eq!(stats.outcome, TunnelOutcome::ClientReset);
    assert_eq!(t.client.view.lock().unwrap().reset, Some(Abort::Cancelled));

    let mut got = Vec::new();
    let read = tokio::time::timeout(LIMIT, t.dest.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::ConnectionReset),
        "the destination must see an RST, not a FIN (read {got:?})"
    );
}

#[tokio::test]
async fn tcp_pump_stops_reading_the_destination_while_the_client_window_is_closed() {
    let mut t = start_tcp(Arc::new(core(|c| c.limits.tcp_buffer_bytes = 16 * 1024)), 0).await;

    // With no credit from the client the pump holds at most one buffer, so the destination's
    // writes block once the kernel's socket buffers are full.
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut written = 0usize;
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(500), t.dest.write(&chunk)).await {
        written += r.unwrap();
        assert!(
            written < 256 << 20,
            "256 MiB went in with the client window closed: the pump buffers without bound"
        );
    }
    assert!(t.client.view.lock().unwrap().received.len() <= chunk.len());

    // Opening the window lets everything through, in order.
    t.window.add_permits(OPEN / 2);
    t.client
        .wait_for("every byte once the window opens", |v| {
            v.received.len() == written
        })
        .await;
    assert!(t
        .client
        .view
        .lock()
        .unwrap()
        .received
        .iter()
        .all(|&b| b == 0x5a));
    t.pump.abort();
}

#[tokio::test(start_paused = true)]
async fn tcp_idle_tunnel_is_closed_after_tcp_idle_secs_with_a_cancel() {
    let core = core(|c| c.timeouts.tcp_idle_secs = 30);
    let (pump_end, _dest) = tcp_pair().await;
    let (rx, tx, client, _from_client, _) = fake_client(OPEN);
    let pump = relay_tcp(&core, pump_end, rx, tx);
    assert_idles_out(pump, &client, Duration::from_secs(30)).await;
}
