//! Both pumps against in-memory fakes of the client side ([`TunnelRecv`] / [`TunnelSend`]) and real
//! loopback sockets on the destination side: half-close, resets each way, back-pressure, idle.
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cfr_proto::capsule;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify, Semaphore};

use super::core::Core;
use super::exchange::{Abort, TunnelRecv, TunnelSend, UdpChannels};
use super::pump::TunnelStats;
use super::{relay_tcp, relay_udp, UdpUplink};
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
    let pump = tokio::spawn(async move {
        let uplink = UdpUplink::new(pump_sock).unwrap();
        relay_udp(&core, &uplink, rx, tx, no_quic_datagrams()).await
    });
    Running {
        pump,
        dest,
        client,
        from_client,
        window,
    }
}

/// On tokio's paused clock: `pump`, which nobody feeds, must end as an idle timeout no sooner than
/// `idle`, with the client side cancelled both ways.
async fn assert_idles_out(
    pump: impl std::future::Future<Output = TunnelStats>,
    client: &Client,
    idle: Duration,
) {
    let started = tokio::time::Instant::now();
    let stats = pump.await;
    assert_eq!(stats.outcome, super::TunnelOutcome::IdleTimeout);
    assert!(started.elapsed() >= idle, "not before the idle time");
    let v = client.view.lock().unwrap();
    assert_eq!(
        (v.reset, v.stopped),
        (Some(Abort::Cancelled), Some(Abort::Cancelled))
    );
}

mod tcp;
mod udp;
