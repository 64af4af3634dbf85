//! The UDP pump: capsules and QUIC datagrams both ways, malformed capsule streams, resets, a slow
//! client, idle timeout.
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cfr_proto::capsule::{Capsule, CapsuleDecoder};
use tokio::sync::mpsc;

use super::*;
use crate::tunnel::exchange::{DatagramOut, DatagramSent};
use crate::tunnel::pump::TunnelOutcome;

#[tokio::test]
async fn udp_capsules_flow_both_ways_and_the_client_fin_ends_the_tunnel_cleanly() {
    let mut t = start_udp(Arc::new(core(|_| {})), OPEN).await;

    t.from_client
        .send(Ok(Some(datagram_capsule(b"hi"))))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(LIMIT, t.dest.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"hi");

    t.dest.send(b"yo").await.unwrap();
    t.client
        .wait_for("the answer as a DATAGRAM capsule", |v| {
            !v.received.is_empty()
        })
        .await;
    let mut decoder = CapsuleDecoder::new(1500);
    decoder.push(&t.client.view.lock().unwrap().received);
    match decoder.next_capsule() {
        Ok(Some(Capsule::Datagram { context_id, data })) => {
            assert_eq!((context_id, &data[..]), (0, &b"yo"[..]))
        }
        other => panic!("want a DATAGRAM capsule with context ID 0, got {other:?}"),
    }

    t.from_client.send(Ok(None)).unwrap();
    let stats = t.stats().await;
    assert_eq!(stats.outcome, TunnelOutcome::Closed);
    assert_eq!((stats.datagrams_up, stats.datagrams_down), (1, 1));
    assert!(t.client.view.lock().unwrap().finished);
}

#[tokio::test]
async fn udp_stream_ending_inside_a_capsule_aborts_with_datagram_error() {
    let mut t = start_udp(Arc::new(core(|_| {})), OPEN).await;

    let whole = datagram_capsule(b"truncated");
    t.from_client.send(Ok(Some(whole.slice(..4)))).unwrap();
    t.from_client.send(Ok(None)).unwrap();
    let stats = t.stats().await;
    assert_eq!(stats.outcome, TunnelOutcome::MalformedCapsule);
    let v = t.client.view.lock().unwrap();
    assert_eq!(v.reset, Some(Abort::DatagramError));
    assert!(!v.finished);
}

#[tokio::test]
async fn udp_client_reset_ends_the_tunnel_with_a_cancel() {
    let mut t = start_udp(Arc::new(core(|_| {})), OPEN).await;

    t.from_client
        .send(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
        .unwrap();
    let stats = t.stats().await;
    assert_eq!(stats.outcome, TunnelOutcome::ClientReset);
    assert_eq!(t.client.view.lock().unwrap().reset, Some(Abort::Cancelled));
}

#[tokio::test]
async fn udp_slow_client_gets_drops_not_an_unbounded_queue() {
    let core = Arc::new(core(|c| c.limits.datagram_queue = 4));
    let t = start_udp(core.clone(), 0).await;

    // The client takes nothing: past the capsule queue, datagrams from the destination are
    // dropped and counted instead of piling up.
    let drops = || core.counters.datagram_drops.load(Ordering::Relaxed);
    let flood = async {
        for i in 0u32.. {
            t.dest.send(&i.to_be_bytes()).await.unwrap();
            if drops() > 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(LIMIT, flood)
        .await
        .expect("a full capsule queue must drop datagrams");

    // The tunnel still works: once the client reads, queued capsules and new datagrams arrive.
    t.window.add_permits(OPEN / 2);
    t.client
        .wait_for("the queued capsules", |v| !v.received.is_empty())
        .await;
    let queued = t.client.view.lock().unwrap().received.len();
    t.dest.send(b"after").await.unwrap();
    t.client
        .wait_for("a datagram sent after the flood", |v| {
            v.received.len() > queued && v.received.ends_with(b"after")
        })
        .await;
    t.pump.abort();
}

#[tokio::test(start_paused = true)]
async fn udp_idle_tunnel_is_closed_after_udp_idle_secs_with_a_cancel() {
    let core = core(|c| c.timeouts.udp_idle_secs = 120);
    let (pump_sock, _dest) = udp_pair().await;
    let (rx, tx, client, _from_client, _) = fake_client(OPEN);
    let uplink = UdpUplink::new(pump_sock).unwrap();
    let pump = relay_udp(&core, &uplink, rx, tx, no_quic_datagrams());
    assert_idles_out(pump, &client, Duration::from_secs(120)).await;
}

/// QUIC DATAGRAM frames towards the client, as (context ID, data), with room for `max` bytes.
struct FakeQuicDatagrams {
    sent: mpsc::UnboundedSender<(u64, Vec<u8>)>,
    max: usize,
}

impl DatagramOut for FakeQuicDatagrams {
    fn begin_batch(&mut self) {}

    fn send(&mut self, context_id: u64, data: &[u8]) -> DatagramSent {
        if data.len() + 1 > self.max {
            return DatagramSent::TooLarge;
        }
        match self.sent.send((context_id, data.to_vec())) {
            Ok(()) => DatagramSent::Sent,
            Err(_) => DatagramSent::Dropped,
        }
    }
}

#[tokio::test]
async fn udp_quic_datagrams_arrive_as_separate_packets_in_order_and_answers_go_back_as_datagrams() {
    let core = Arc::new(core(|_| {}));
    let (pump_sock, dest) = udp_pair().await;
    let (rx, tx, client, from_client, _) = fake_client(OPEN);
    let (sent, mut to_client) = mpsc::unbounded_channel();
    let channels = UdpChannels {
        datagrams_out: Some(Box::new(FakeQuicDatagrams { sent, max: 1400 })),
    };
    let uplink = Arc::new(UdpUplink::new(pump_sock).unwrap());
    // One burst as the HTTP/3 datagram reader hands it over (one GSO sendmsg where the kernel has
    // it): each must still arrive as its own datagram, in order; the unknown context ID is
    // dropped (RFC 9298 §5).
    let mut burst: Vec<Bytes> = (0u8..5)
        .map(|i| {
            let mut payload = vec![0x00]; // context ID 0: a UDP payload
            payload.extend_from_slice(&[i; 1200]);
            Bytes::from(payload)
        })
        .collect();
    burst.insert(2, Bytes::from_static(&[0x07, 0xee, 0xee]));
    uplink.send_datagrams(&core, &mut burst);
    assert!(burst.is_empty(), "the burst is consumed");
    let mut pump = {
        let (core, uplink) = (core.clone(), uplink.clone());
        tokio::spawn(async move { relay_udp(&core, &uplink, rx, tx, channels).await })
    };

    let mut buf = [0u8; 2048];
    for i in 0u8..5 {
        let n = tokio::time::timeout(LIMIT, dest.recv(&mut buf))
            .await
            .expect("every queued datagram reaches the destination")
            .unwrap();
        assert_eq!(n, 1200, "datagram {i} keeps its own boundary");
        assert!(
            buf[..n].iter().all(|&b| b == i),
            "datagram {i} out of order or mixed"
        );
    }

    // The client never sent a capsule, so answers go back as QUIC datagrams.
    dest.send(b"answer").await.unwrap();
    let answer = tokio::time::timeout(LIMIT, to_client.recv()).await.unwrap();
    assert_eq!(answer, Some((0, b"answer".to_vec())));
    assert!(
        client.view.lock().unwrap().received.is_empty(),
        "no capsule was sent"
    );

    from_client.send(Ok(None)).unwrap();
    let stats = ended(&mut pump).await;
    assert_eq!(stats.outcome, TunnelOutcome::Closed);
    assert_eq!((stats.datagrams_up, stats.datagrams_down), (5, 1));
}
