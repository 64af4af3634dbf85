//! Both pumps against in-memory fakes of the client side ([`TunnelRecv`] / [`TunnelSend`]) and real
//! loopback sockets on the destination side: half-close, resets each way, back-pressure, idle.
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cfr_proto::capsule::{self, Capsule, CapsuleDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify, Semaphore};

use super::core::Core;
use super::exchange::{Abort, TunnelRecv, TunnelSend, UdpChannels};
use super::pump::{TunnelOutcome, TunnelStats};
use super::{relay_tcp, relay_udp};
use crate::auth::Authenticator;
use crate::config::RelayConfig;
use crate::policy::DestinationPolicy;
use crate::resolve::NeverResolves;

/// Bound on every wait in these tests; they end well before it unless the pump is broken.
const LIMIT: Duration = Duration::from_secs(10);

fn core(adjust: impl FnOnce(&mut RelayConfig)) -> Core {
    let mut config = RelayConfig::default();
    adjust(&mut config);
    config.validate().expect("test config");
    let auth = Authenticator::new(&config.auth, &[]).expect("auth");
    let policy = DestinationPolicy::new(&config.policy);
    let egress = cfr_egress::EgressPool::new(&config.egress).expect("egress");
    Core::new(config, auth, policy, egress, Arc::new(NeverResolves))
}

/// What the client side of a tunnel saw, shared between a [`FakeSend`] and the test.
#[derive(Default)]
struct ClientView {
    received: Vec<u8>,
    finished: bool,
    reset: Option<Abort>,
    stopped: Option<Abort>,
}

#[derive(Clone, Default)]
struct Client {
    view: Arc<Mutex<ClientView>>,
    changed: Arc<Notify>,
}

impl Client {
    /// Waits until `done` holds for what the client saw, or panics naming `what`.
    async fn wait_for(&self, what: &str, done: impl Fn(&ClientView) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if done(&self.view.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(LIMIT, wait)
            .await
            .unwrap_or_else(|_| panic!("client side never saw: {what}"));
    }

    fn update(&self, f: impl FnOnce(&mut ClientView)) {
        f(&mut self.view.lock().unwrap());
        self.changed.notify_waiters();
    }
}

/// The client's request stream as the pump reads it: chunks, FIN (`Ok(None)`) or a reset (`Err`)
/// fed by the test; pending once the test has nothing more to say.
struct FakeRecv {
    from_client: mpsc::UnboundedReceiver<io::Result<Option<Bytes>>>,
    client: Client,
}

impl TunnelRecv for FakeRecv {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match self.from_client.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    fn abort(&mut self, why: Abort) {
        self.client.update(|v| v.stopped = Some(why));
    }
}

/// The response stream towards the client; each `send` needs a credit from `window`, like a
/// flow-control window the client has to open.
struct FakeSend {
    client: Client,
    window: Arc<Semaphore>,
}

impl TunnelSend for FakeSend {
    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.window.acquire().await.expect("window open").forget();
        self.client.update(|v| v.received.extend_from_slice(&data));
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.client.update(|v| v.finished = true);
        Ok(())
    }

    fn reset(&mut self, why: Abort) {
        self.client.update(|v| v.reset = Some(why));
    }
}

/// A client side whose send window starts at `window` credits, the sender that plays the client's
/// stream, and the window.
fn fake_client(window: usize) -> (FakeRecv, FakeSend, Client, ClientStream, Arc<Semaphore>) {
    let client = Client::default();
    let (tx, rx) = mpsc::unbounded_channel();
    let window = Arc::new(Semaphore::new(window));
    let recv = FakeRecv {
        from_client: rx,
        client: client.clone(),
    };
    let send = FakeSend {
        client: client.clone(),
        window: window.clone(),
    };
    (recv, send, client, tx, window)
}

/// Plays the client's request stream: chunks, `Ok(None)` for FIN, `Err` for a reset.
type ClientStream = mpsc::UnboundedSender<io::Result<Option<Bytes>>>;

const OPEN: usize = Semaphore::MAX_PERMITS;

/// (the pump's end, the destination's end) of one loopback TCP connection.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pump = TcpStream::connect(listener.local_addr().unwrap());
    let (pump, accepted) = tokio::join!(pump, listener.accept());
    (pump.unwrap(), accepted.unwrap().0)
}

/// (the pump's socket, the destination's socket), connected to each other.
async fn udp_pair() -> (UdpSocket, UdpSocket) {
    let pump = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dest = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    pump.connect(dest.local_addr().unwrap()).await.unwrap();
    dest.connect(pump.local_addr().unwrap()).await.unwrap();
    // The pump sends with `try_send`, which needs the reactor to have seen the socket writable
    // (in the relay, answering the request gives it that time).
    pump.writable().await.unwrap();
    (pump, dest)
}

fn no_quic_datagrams() -> UdpChannels {
    UdpChannels {
        datagrams_in: None,
        datagrams_out: None,
    }
}

fn datagram_capsule(payload: &[u8]) -> Bytes {
    let mut c = Vec::new();
    capsule::encode_datagram(0, payload, &mut c);
    Bytes::from(c)
}

/// A pump running in its own task between a fake client and a real destination socket.
struct Running<D> {
    pump: tokio::task::JoinHandle<TunnelStats>,
    dest: D,
    client: Client,
    from_client: ClientStream,
    window: Arc<Semaphore>,
}

impl<D> Running<D> {
    /// How the tunnel ended, once the pump has.
    async fn stats(&mut self) -> TunnelStats {
        ended(&mut self.pump).await
    }
}

async fn ended(pump: &mut tokio::task::JoinHandle<TunnelStats>) -> TunnelStats {
    tokio::time::timeout(LIMIT, pump)
        .await
        .expect("the pump must end")
        .expect("the pump must not panic")
}

async fn start_tcp(core: Arc<Core>, window: usize) -> Running<TcpStream> {
    let (pump_end, dest) = tcp_pair().await;
    let (rx, tx, client, from_client, window) = fake_client(window);
    let pump = tokio::spawn(async move { relay_tcp(&core, pump_end, rx, tx).await });
    Running {
        pump,
        dest,
        client,
        from_client,
        window,
    }
}

async fn start_udp(core: Arc<Core>, window: usize) -> Running<UdpSocket> {
    let (pump_sock, dest) = udp_pair().await;
    let (rx, tx, client, from_client, window) = fake_client(window);
    let pump =
        tokio::spawn(async move { relay_udp(&core, pump_sock, rx, tx, no_quic_datagrams()).await });
    Running {
        pump,
        dest,
        client,
        from_client,
        window,
    }
}

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
    let started = tokio::time::Instant::now();
    let stats = relay_tcp(&core, pump_end, rx, tx).await;
    assert_eq!(stats.outcome, TunnelOutcome::IdleTimeout);
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "not before the idle time"
    );
    assert_eq!(client.view.lock().unwrap().reset, Some(Abort::Cancelled));
}

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
    let started = tokio::time::Instant::now();
    let stats = relay_udp(&core, pump_sock, rx, tx, no_quic_datagrams()).await;
    assert_eq!(stats.outcome, TunnelOutcome::IdleTimeout);
    assert!(
        started.elapsed() >= Duration::from_secs(120),
        "not before the idle time"
    );
    let v = client.view.lock().unwrap();
    assert_eq!(
        (v.reset, v.stopped),
        (Some(Abort::Cancelled), Some(Abort::Cancelled))
    );
}
