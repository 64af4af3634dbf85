//! Destination servers for end-to-end tests.
//!
//! Every origin binds a loopback address (it panics on anything else: tests must never reach out),
//! starts in one line inside a tokio runtime, records what it saw, and owns its tasks: dropping the
//! origin aborts its accept loop, and with it (through a `JoinSet`) every connection task.
//!
//! All TLS uses the ring provider explicitly and one process-wide development PKI ([`dev_pki`]): a
//! CA plus a leaf for `localhost`, `127.0.0.1` and `::1`, so one CA file trusts every origin.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::RootCertStore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// Body of `GET /` on [`HttpsOrigin`] and [`H3Origin`].
pub const ROOT_BODY: &[u8] = b"cfr-testkit origin: hello\n";
/// Body of `GET /page.html` on [`HttpsOrigin`] and [`H3Origin`] (`text/html`, for browsers, which download rather
/// than render the octet-stream `/`); it contains [`ROOT_BODY`]'s text.
pub const PAGE_HTML: &[u8] =
    b"<!DOCTYPE html><html><head><title>cfr-testkit</title></head><body><p id=\"origin\">cfr-testkit origin: hello</p></body></html>\n";
/// Longest marker accepted by `GET /page/MARKER.html`.
pub const MAX_PAGE_MARKER: usize = 64;

/// Body of `GET /page/MARKER.html`: [`PAGE_HTML`] plus `<p id="marker">MARKER</p>`, so a browser's
/// DOM shows that this origin answered this very request (interop/run's Firefox cells put a
/// per-cell nonce there). MARKER is ASCII letters, digits and `-`, at most [`MAX_PAGE_MARKER`].
pub fn marker_page_html(marker: &str) -> Option<String> {
    let valid = !marker.is_empty()
        && marker.len() <= MAX_PAGE_MARKER
        && marker
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    valid.then(|| {
        format!(
            "<!DOCTYPE html><html><head><title>cfr-testkit</title></head><body>\
             <p id=\"origin\">cfr-testkit origin: hello</p><p id=\"marker\">{marker}</p></body></html>\n"
        )
    })
}

/// Largest `N` accepted by `GET /bytes/N` (the body is built in memory).
pub const MAX_BYTES_ROUTE: u64 = 64 * 1024 * 1024;
/// Pattern seed of `GET /bytes/N` bodies: `pattern_bytes(BYTES_ROUTE_SEED, 0, N)`.
pub const BYTES_ROUTE_SEED: u64 = 0;
/// Pattern seed of what [`tls_client_roundtrip`] uploads.
pub const TLS_UPLOAD_SEED: u64 = 1;
/// Pattern seed of what [`TlsSink`] sends back.
pub const TLS_DOWNLOAD_SEED: u64 = 2;

/// A fatal TLS `handshake_failure` alert record: a [`RecordingTcp`] reply that makes a TLS
/// client give up at once instead of waiting for a ServerHello.
pub const TLS_HANDSHAKE_FAILURE_ALERT: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

/// Bound on any single test-side wait (a TLS session, a recording, a full roundtrip).
const WAIT_LIMIT: Duration = Duration::from_secs(60);
/// A connection that sends nothing for this long is closed by the origins that read until EOF.
const IDLE_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Deterministic bytes
// ---------------------------------------------------------------------------------------------

/// Byte `i` of pattern `seed` is byte `i % 8` (little endian) of `splitmix64(seed, i / 8)`.
///
/// Position-addressable, so any chunk of a long stream can be produced independently; the Python
/// interop clients (`interop/pattern.py`) implement the same function.
pub fn pattern_fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *b = splitmix64(seed, pos / 8).to_le_bytes()[(pos % 8) as usize];
    }
}

/// `len` bytes of pattern `seed` starting at `offset`.
pub fn pattern_bytes(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    pattern_fill(seed, offset, &mut v);
    v
}

/// SHA-256 of the first `len` bytes of pattern `seed`.
pub fn pattern_sha256(seed: u64, len: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern_fill(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().into()
}

fn splitmix64(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(index.wrapping_add(1))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// Development PKI
// ---------------------------------------------------------------------------------------------

/// The ring crypto provider; every TLS config here is built with it, never the process default.
pub fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A throw-away CA and a leaf certificate for `localhost`, `127.0.0.1` and `::1`.
pub struct DevPki {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    leaf_der: CertificateDer<'static>,
    leaf_key: PrivatePkcs8KeyDer<'static>,
}

/// The process-wide development PKI, generated on first use.
pub fn dev_pki() -> &'static DevPki {
    static PKI: OnceLock<DevPki> = OnceLock::new();
    PKI.get_or_init(DevPki::generate)
}

impl DevPki {
    /// Generates a fresh CA and leaf (prefer the shared [`dev_pki`]).
    pub fn generate() -> DevPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

        let ca_key = KeyPair::generate().expect("rcgen: CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("rcgen: CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cfr-testkit dev CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).expect("rcgen: CA cert");

        let leaf_key = KeyPair::generate().expect("rcgen: leaf key");
        let mut leaf_params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .expect("rcgen: leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("rcgen: leaf cert");

        DevPki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            leaf_der: leaf.der().clone(),
            leaf_key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        }
    }

    /// DER of the CA certificate (trust anchor for test clients).
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// PEM of the CA certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A root store trusting only the dev CA.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der())
            .expect("dev CA is a valid trust anchor");
        roots
    }

    /// Leaf chain (leaf, CA) and key, for servers that build their own config (e.g. the relay).
    pub fn server_cert(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.leaf_der.clone(), self.ca_der.clone()],
            PrivateKeyDer::Pkcs8(self.leaf_key.clone_key()),
        )
    }

    /// A TLS 1.3-only server config (ring provider) offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let (chain, key) = self.server_cert();
        let mut cfg = rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("dev leaf matches its key");
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg
    }

    /// A TLS 1.3-only client config (ring provider) trusting the dev CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        client_config(self.roots(), alpn)
    }
}

fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// The dev CA written as PEM into a temporary directory that lives as long as this value.
struct CaFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl CaFile {
    fn write(pki: &DevPki) -> CaFile {
        let dir = tempfile::tempdir().expect("tempdir for CA PEM");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, pki.ca_pem()).expect("write CA PEM");
        CaFile { _dir: dir, path }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared plumbing
// ---------------------------------------------------------------------------------------------

fn assert_loopback(what: &str, bind: SocketAddr) {
    assert!(
        bind.ip().is_loopback(),
        "{what}: refusing to bind {bind}: origins listen on loopback only"
    );
}

async fn bind_tcp(what: &str, bind: SocketAddr) -> TcpListener {
    assert_loopback(what, bind);
    TcpListener::bind(bind)
        .await
        .unwrap_or_else(|e| panic!("{what}: bind {bind}: {e}"))
}

/// A log that tests can read at any time and wait on with a bound.
struct Log<T> {
    items: Mutex<Vec<T>>,
    changed: Notify,
}

impl<T: Clone> Log<T> {
    fn new() -> Arc<Self> {
        Arc::new(Log {
            items: Mutex::new(Vec::new()),
            changed: Notify::new(),
        })
    }

    fn push(&self, item: T) {
        self.items.lock().unwrap().push(item);
        self.changed.notify_waiters();
    }

    fn update(&self, f: impl FnOnce(&mut Vec<T>)) {
        f(&mut self.items.lock().unwrap());
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> Vec<T> {
        self.items.lock().unwrap().clone()
    }

    /// Waits until `done(items)` holds, at most `limit`; returns the items either way.
    async fn wait_until(&self, limit: Duration, done: impl Fn(&[T]) -> bool) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let items = self.items.lock().unwrap();
                if done(&items) {
                    return items.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.snapshot();
            }
        }
    }
}

/// Owns a server's accept loop. Dropping it aborts the loop; the loop's `JoinSet` of connection
/// tasks is dropped with it, which aborts them too.
struct Owned(JoinHandle<()>);

impl Owned {
    fn spawn(fut: impl Future<Output = ()> + Send + 'static) -> Owned {
        Owned(tokio::spawn(fut))
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts TCP connections forever, running `serve` for each in a task owned by the loop.
async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve(stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "origin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TcpEcho
// ---------------------------------------------------------------------------------------------

/// TCP echo server, half-close aware: after the client's FIN it finishes echoing, then sends FIN.
pub struct TcpEcho {
    addr: SocketAddr,
    peers: Arc<Log<SocketAddr>>,
    _task: Owned,
}

impl TcpEcho {
    pub async fn start(bind: SocketAddr) -> TcpEcho {
        let listener = bind_tcp("TcpEcho", bind).await;
        let addr = listener.local_addr().unwrap();
        let peers = Log::new();
        let log = peers.clone();
        let task = Owned::spawn(accept_loop(listener, move |mut stream, peer| {
            log.push(peer);
            async move {
                let (mut rd, mut wr) = stream.split();
                // copy returns at the client's FIN, after everything before it was written back.
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = wr.shutdown().await;
                }
            }
        }));
        TcpEcho {
            addr,
            peers,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Source address of every accepted connection, in accept order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.snapshot()
    }
}

// ---------------------------------------------------------------------------------------------
// UdpEcho
// ---------------------------------------------------------------------------------------------

/// UDP echo server: every datagram (empty ones too) goes back to its sender unchanged.
pub struct UdpEcho {
    addr: SocketAddr,
    peers: Arc<Log<SocketAddr>>,
    count: Arc<Log<()>>,
    _task: Owned,
}

impl UdpEcho {
    pub async fn start(bind: SocketAddr) -> UdpEcho {
        assert_loopback("UdpEcho", bind);
        let socket = UdpSocket::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("UdpEcho: bind {bind}: {e}"));
        let addr = socket.local_addr().unwrap();
        let peers = Log::new();
        let count = Log::new();
        let (peer_log, count_log) = (peers.clone(), count.clone());
        let task = Owned::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let mut seen = HashSet::new();
            loop {
                let (n, from) = match socket.recv_from(&mut buf).await {
                    Ok(r) => r,
                    // e.g. ICMP port unreachable surfacing as ECONNREFUSED: keep serving.
                    Err(_) => continue,
                };
                if seen.insert(from) {
                    peer_log.push(from);
                }
                count_log.push(());
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        UdpEcho {
            addr,
            peers,
            count,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Distinct source addresses seen, in order of first datagram.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.snapshot()
    }

    /// Number of datagrams received (and echoed).
    pub fn count(&self) -> usize {
        self.count.items.lock().unwrap().len()
    }

    /// Waits (at most `limit`) until at least `n` datagrams arrived; returns the count.
    pub async fn wait_count(&self, n: usize, limit: Duration) -> usize {
        self.count.wait_until(limit, |c| c.len() >= n).await.len()
    }
}

// ---------------------------------------------------------------------------------------------
// TlsSink + tls_client_roundtrip
// ---------------------------------------------------------------------------------------------

/// What one TLS session carried, as seen by one side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsTranscript {
    pub peer: Option<SocketAddr>,
    pub received_len: u64,
    pub received_sha256: [u8; 32],
    pub sent_len: u64,
    pub sent_sha256: [u8; 32],
}

/// TLS 1.3 server (dev cert, ALPN none) that hashes all plaintext it reads until the client's
/// close_notify, while concurrently sending `download_len` bytes of pattern [`TLS_DOWNLOAD_SEED`]
/// and then its own close_notify. Each finished session is recorded as a [`TlsTranscript`].
pub struct TlsSink {
    addr: SocketAddr,
    sessions: Arc<Log<TlsTranscript>>,
    errors: Arc<Log<String>>,
    _task: Owned,
}

impl TlsSink {
    pub async fn start(bind: SocketAddr, download_len: u64) -> TlsSink {
        let listener = bind_tcp("TlsSink", bind).await;
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(dev_pki().server_config(&[])));
        let sessions = Log::new();
        let errors = Log::new();
        let (s_log, e_log) = (sessions.clone(), errors.clone());
        let task = Owned::spawn(accept_loop(listener, move |tcp, peer| {
            let (acceptor, s_log, e_log) = (acceptor.clone(), s_log.clone(), e_log.clone());
            async move {
                let run = async {
                    let tls = acceptor.accept(tcp).await?;
                    let mut t = exchange(tls, download_len, TLS_DOWNLOAD_SEED).await?;
                    t.peer = Some(peer);
                    io::Result::Ok(t)
                };
                match tokio::time::timeout(WAIT_LIMIT, run).await {
                    Ok(Ok(t)) => s_log.push(t),
                    Ok(Err(e)) => e_log.push(format!("{peer}: {e}")),
                    Err(_) => e_log.push(format!("{peer}: session exceeded {WAIT_LIMIT:?}")),
                }
            }
        }));
        TlsSink {
            addr,
            sessions,
            errors,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Finished sessions.
    pub fn sessions(&self) -> Vec<TlsTranscript> {
        self.sessions.snapshot()
    }

    /// Sessions that failed (handshake, I/O, timeout), as messages.
    pub fn errors(&self) -> Vec<String> {
        self.errors.snapshot()
    }

    /// Waits (bounded) for the next finished session beyond the first `seen`; `None` on timeout.
    pub async fn wait_session(&self, seen: usize, limit: Duration) -> Option<TlsTranscript> {
        self.sessions
            .wait_until(limit, |s| s.len() > seen)
            .await
            .get(seen)
            .cloned()
    }
}

/// Reads everything (hashing it) while writing `send_len` pattern bytes, then close_notify.
async fn exchange<S>(stream: S, send_len: u64, send_seed: u64) -> io::Result<TlsTranscript>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let reader = async {
        let mut h = Sha256::new();
        let mut len = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return io::Result::Ok((len, h.finalize().into()));
            }
            h.update(&buf[..n]);
            len += n as u64;
        }
    };
    let writer = async {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < send_len {
            let n = (send_len - off).min(buf.len() as u64) as usize;
            pattern_fill(send_seed, off, &mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        // TLS close_notify, then TCP FIN (or the tunnel's equivalent).
        wr.shutdown().await?;
        io::Result::Ok(h.finalize().into())
    };
    let ((received_len, received_sha256), sent_sha256) = tokio::try_join!(reader, writer)?;
    Ok(TlsTranscript {
        peer: None,
        received_len,
        received_sha256,
        sent_len: send_len,
        sent_sha256,
    })
}

/// Runs a rustls TLS 1.3 client over any byte stream (e.g. a tunnel): uploads `upload_len`
/// bytes of pattern [`TLS_UPLOAD_SEED`] while reading until the server's close_notify. Fails if
/// the download is not exactly `download_len` bytes, or after 60 s.
///
/// Compare the result with the server's [`TlsTranscript`]: `sent_sha256` here equals its
/// `received_sha256` and vice versa when the tunnel left the inner TLS untouched.
pub async fn tls_client_roundtrip<S>(
    stream: S,
    server_name: &str,
    roots: RootCertStore,
    upload_len: u64,
    download_len: u64,
) -> io::Result<TlsTranscript>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(roots, &[])));
    let run = async {
        let tls = connector.connect(name, stream).await?;
        exchange(tls, upload_len, TLS_UPLOAD_SEED).await
    };
    let t = tokio::time::timeout(WAIT_LIMIT, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS roundtrip exceeded 60 s"))??;
    if t.received_len != download_len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "expected {download_len} bytes from the TLS server, got {}",
                t.received_len
            ),
        ));
    }
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// RecordingTcp
// ---------------------------------------------------------------------------------------------

/// The exact bytes one connection sent to a [`RecordingTcp`].
#[derive(Clone, Debug)]
pub struct Recording {
    pub peer: SocketAddr,
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, final once `closed`.
    pub sha256: [u8; 32],
    /// The client sent FIN (or reset, or idled out).
    pub closed: bool,
}

/// How a TCP peer ended a connection, as the destination saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEnd {
    /// A clean close (FIN).
    Fin,
    /// An abort (RST).
    Reset,
    /// Another read error.
    Error,
    /// Nothing for [`IDLE_LIMIT`].
    Silent,
}

/// A destination that accepts one TCP connection, records the bytes it receives and reports how
/// the peer ended the connection: FIN or RST (the one RST-detecting listener of the tests).
pub struct TcpEndWatch {
    addr: SocketAddr,
    received: tokio::sync::watch::Receiver<Vec<u8>>,
    end: tokio::sync::oneshot::Receiver<PeerEnd>,
    _task: Owned,
}

impl TcpEndWatch {
    pub async fn start(bind: SocketAddr) -> TcpEndWatch {
        let listener = bind_tcp("TcpEndWatch", bind).await;
        let addr = listener.local_addr().unwrap();
        let (bytes_tx, received) = tokio::sync::watch::channel(Vec::new());
        let (end_tx, end) = tokio::sync::oneshot::channel();
        let task = Owned(tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let outcome = loop {
                match tokio::time::timeout(IDLE_LIMIT, s.read(&mut buf)).await {
                    Ok(Ok(0)) => break PeerEnd::Fin,
                    Ok(Ok(n)) => bytes_tx.send_modify(|b| b.extend_from_slice(&buf[..n])),
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                        break PeerEnd::Reset
                    }
                    Ok(Err(_)) => break PeerEnd::Error,
                    Err(_) => break PeerEnd::Silent,
                }
            };
            let _ = end_tx.send(outcome);
        }));
        TcpEndWatch {
            addr,
            received,
            end,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits (at most `limit`) until at least `len` bytes arrived; returns what arrived.
    pub async fn received_at_least(&self, len: usize, limit: Duration) -> Vec<u8> {
        let mut rx = self.received.clone();
        let _ = tokio::time::timeout(limit, rx.wait_for(|b| b.len() >= len)).await;
        let got = self.received.borrow().clone();
        assert!(
            got.len() >= len,
            "expected {len} bytes at the destination within {limit:?}, got {}",
            got.len()
        );
        got
    }

    /// How the connection ended (at most `limit`), and every byte received.
    pub async fn end(self, limit: Duration) -> (PeerEnd, Vec<u8>) {
        let end = tokio::time::timeout(limit, self.end)
            .await
            .expect("the destination connection ends within the limit")
            .expect("the destination accepted a connection");
        let bytes = self.received.borrow().clone();
        (end, bytes)
    }
}

/// A destination that resets (RST) every connection as soon as its first bytes arrive — after
/// the relay has answered the CONNECT, since the client sends only after the 2xx.
pub struct ResettingTcp {
    addr: SocketAddr,
    _task: Owned,
}

impl ResettingTcp {
    pub async fn start(bind: SocketAddr) -> ResettingTcp {
        let listener = bind_tcp("ResettingTcp", bind).await;
        let addr = listener.local_addr().unwrap();
        let task = Owned::spawn(accept_loop(listener, |mut stream, _| async move {
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(IDLE_LIMIT, stream.read(&mut buf)).await;
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
        }));
        ResettingTcp { addr, _task: task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Raw TCP server recording every byte received. When the first bytes arrive it writes `reply`
/// (once), then keeps reading until the client's FIN (or 30 s of silence), then closes.
pub struct RecordingTcp {
    addr: SocketAddr,
    recordings: Arc<Log<Recording>>,
    _task: Owned,
}

impl RecordingTcp {
    pub async fn start(bind: SocketAddr, reply: impl Into<Bytes>) -> RecordingTcp {
        let reply: Bytes = reply.into();
        let listener = bind_tcp("RecordingTcp", bind).await;
        let addr = listener.local_addr().unwrap();
        let recordings = Log::new();
        let log = recordings.clone();
        let task = Owned::spawn(accept_loop(listener, move |mut stream, peer| {
            let (log, reply) = (log.clone(), reply.clone());
            let index = {
                let mut items = log.items.lock().unwrap();
                items.push(Recording {
                    peer,
                    bytes: Vec::new(),
                    sha256: Sha256::digest([]).into(),
                    closed: false,
                });
                items.len() - 1
            };
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut replied = reply.is_empty();
                loop {
                    let n = match tokio::time::timeout(IDLE_LIMIT, stream.read(&mut buf)).await {
                        Ok(Ok(n)) => n,
                        _ => 0,
                    };
                    log.update(|items| {
                        let r = &mut items[index];
                        r.bytes.extend_from_slice(&buf[..n]);
                        r.sha256 = Sha256::digest(&r.bytes).into();
                        r.closed = n == 0;
                    });
                    if n == 0 {
                        break;
                    }
                    if !replied {
                        replied = true;
                        // A failed write means the client went away; still record what it sent.
                        let _ = stream.write_all(&reply).await;
                    }
                }
                let _ = stream.shutdown().await;
            }
        }));
        RecordingTcp {
            addr,
            recordings,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One entry per accepted connection, in accept order (live: may still be growing).
    pub fn recordings(&self) -> Vec<Recording> {
        self.recordings.snapshot()
    }

    /// Waits (bounded) until connection `index` has sent at least `min_len` bytes or closed.
    pub async fn wait_recording(
        &self,
        index: usize,
        min_len: usize,
        limit: Duration,
    ) -> Option<Recording> {
        self.recordings
            .wait_until(limit, |r| {
                r.get(index)
                    .is_some_and(|r| r.closed || r.bytes.len() >= min_len)
            })
            .await
            .get(index)
            .cloned()
    }
}

/// Extension types of a TLS ClientHello at the start of `bytes` (one record, possibly split
/// over several), or `None` if `bytes` does not start with a complete ClientHello.
///
/// Used to check that e.g. an ECH extension (0xfe0d) reached the destination unchanged.
pub fn client_hello_extensions(bytes: &[u8]) -> Option<Vec<u16>> {
    // Reassemble the handshake message from consecutive handshake records (RFC 8446 §5.1).
    let mut hs = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 && rest[0] == 22 {
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        let frag = rest.get(5..5 + len)?;
        hs.extend_from_slice(frag);
        rest = &rest[5 + len..];
        if hs.len() >= 4 && hs.len() >= 4 + u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize {
            break;
        }
    }
    let mut b = hs.as_slice();
    if b.first() != Some(&1) {
        return None;
    }
    let body_len = u32::from_be_bytes([0, *b.get(1)?, *b.get(2)?, *b.get(3)?]) as usize;
    b = b.get(4..4 + body_len)?;
    // legacy_version(2) random(32)
    b = b.get(34..)?;
    let skip = |b: &[u8], width: usize| -> Option<usize> {
        let len = match width {
            1 => *b.first()? as usize,
            _ => u16::from_be_bytes([*b.first()?, *b.get(1)?]) as usize,
        };
        Some(width + len)
    };
    b = b.get(skip(b, 1)?..)?; // legacy_session_id
    b = b.get(skip(b, 2)?..)?; // cipher_suites
    b = b.get(skip(b, 1)?..)?; // legacy_compression_methods
    let ext_len = u16::from_be_bytes([*b.first()?, *b.get(1)?]) as usize;
    let mut ext = b.get(2..2 + ext_len)?;
    let mut types = Vec::new();
    while !ext.is_empty() {
        types.push(u16::from_be_bytes([*ext.first()?, *ext.get(1)?]));
        let len = u16::from_be_bytes([*ext.get(2)?, *ext.get(3)?]) as usize;
        ext = ext.get(4 + len..)?;
    }
    Some(types)
}

// ---------------------------------------------------------------------------------------------
// HTTPS (h1 + h2) and HTTP/3 origins
// ---------------------------------------------------------------------------------------------

/// One request an HTTP origin answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub peer: SocketAddr,
    pub version: http::Version,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
}

/// The routes both HTTP origins serve: `GET /` → [`ROOT_BODY`]; `GET /page.html` → [`PAGE_HTML`];
/// `GET /page/MARKER.html` → [`marker_page_html`]; `GET /bytes/N` → N bytes of pattern
/// [`BYTES_ROUTE_SEED`]; anything else 404 (or 405 for non-GET).
fn route(method: &http::Method, path: &str) -> (http::StatusCode, Bytes) {
    use http::StatusCode;
    if method != http::Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, Bytes::new());
    }
    if path == "/" {
        return (StatusCode::OK, Bytes::from_static(ROOT_BODY));
    }
    if path == "/page.html" {
        return (StatusCode::OK, Bytes::from_static(PAGE_HTML));
    }
    if let Some(marker) = path
        .strip_prefix("/page/")
        .and_then(|p| p.strip_suffix(".html"))
    {
        return match marker_page_html(marker) {
            Some(page) => (StatusCode::OK, page.into()),
            None => (StatusCode::BAD_REQUEST, Bytes::new()),
        };
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        return match n.parse::<u64>() {
            Ok(n) if n <= MAX_BYTES_ROUTE => (
                StatusCode::OK,
                pattern_bytes(BYTES_ROUTE_SEED, 0, n as usize).into(),
            ),
            _ => (StatusCode::BAD_REQUEST, Bytes::new()),
        };
    }
    (StatusCode::NOT_FOUND, Bytes::new())
}

/// `text/html` for the `.html` routes (browsers render them), octet-stream for the rest.
fn content_type(path: &str) -> &'static str {
    if path.ends_with(".html") {
        "text/html; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

/// The accessors [`HttpsOrigin`] and [`H3Origin`] share (both have `addr`, `ca` and `requests`).
macro_rules! web_origin_accessors {
    ($origin:ty) => {
        impl $origin {
            pub fn addr(&self) -> SocketAddr {
                self.addr
            }

            /// PEM file of the CA that signed this origin's certificate (removed on drop).
            pub fn ca_pem_path(&self) -> &Path {
                &self.ca.path
            }

            pub fn ca_der(&self) -> CertificateDer<'static> {
                dev_pki().ca_der()
            }

            /// `https://127.0.0.1:PORT/path` or `https://[::1]:PORT/path` (the bound address; the
            /// certificate covers both literals and `localhost`).
            pub fn url(&self, path: &str) -> String {
                format!("https://{}{path}", self.addr)
            }

            /// `https://localhost:PORT/path`, for tests that want the relay to resolve a name.
            pub fn localhost_url(&self, path: &str) -> String {
                format!("https://localhost:{}{path}", self.addr.port())
            }

            pub fn requests(&self) -> Vec<SeenRequest> {
                self.requests.snapshot()
            }
        }
    };
}

/// HTTPS origin: HTTP/1.1 and HTTP/2 (ALPN `h2`, `http/1.1`) over TLS 1.3 with the dev cert.
pub struct HttpsOrigin {
    addr: SocketAddr,
    ca: CaFile,
    requests: Arc<Log<SeenRequest>>,
    _task: Owned,
}

impl HttpsOrigin {
    pub async fn start(bind: SocketAddr) -> HttpsOrigin {
        let listener = bind_tcp("HttpsOrigin", bind).await;
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            dev_pki().server_config(&[b"h2", b"http/1.1"]),
        ));
        let requests = Log::new();
        let log = requests.clone();
        let task = Owned::spawn(accept_loop(listener, move |tcp, peer| {
            let (acceptor, log) = (acceptor.clone(), log.clone());
            async move {
                let Ok(Ok(tls)) = tokio::time::timeout(WAIT_LIMIT, acceptor.accept(tcp)).await
                else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let (status, body) = route(req.method(), &path);
                        let content_type = content_type(&path);
                        log.push(SeenRequest {
                            peer,
                            version: req.version(),
                            method: req.method().clone(),
                            path,
                            status: status.as_u16(),
                        });
                        let resp = http::Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, content_type)
                            .body(Full::new(body))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
            }
        }));
        HttpsOrigin {
            addr,
            ca: CaFile::write(dev_pki()),
            requests,
            _task: task,
        }
    }
}

web_origin_accessors!(HttpsOrigin);

/// HTTP/3 origin (quinn + h3, ALPN `h3`, dev cert) serving the same routes as [`HttpsOrigin`].
pub struct H3Origin {
    addr: SocketAddr,
    ca: CaFile,
    endpoint: quinn::Endpoint,
    requests: Arc<Log<SeenRequest>>,
    _task: Owned,
}

impl H3Origin {
    pub async fn start(bind: SocketAddr) -> H3Origin {
        assert_loopback("H3Origin", bind);
        let tls = Arc::new(dev_pki().server_config(&[b"h3"]));
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .expect("TLS 1.3 config with an initial suite");
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, bind)
            .unwrap_or_else(|e| panic!("H3Origin: bind {bind}: {e}"));
        let addr = endpoint.local_addr().unwrap();
        let requests = Log::new();
        let (ep, log) = (endpoint.clone(), requests.clone());
        let task = Owned::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    incoming = ep.accept() => match incoming {
                        Some(incoming) => {
                            conns.spawn(serve_h3(incoming, log.clone()));
                        }
                        None => return,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        H3Origin {
            addr,
            ca: CaFile::write(dev_pki()),
            endpoint,
            requests,
            _task: task,
        }
    }
}

web_origin_accessors!(H3Origin);

impl Drop for H3Origin {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"origin stopped");
    }
}

async fn serve_h3(incoming: quinn::Incoming, log: Arc<Log<SeenRequest>>) {
    let Ok(Ok(conn)) = tokio::time::timeout(WAIT_LIMIT, incoming).await else {
        return;
    };
    let peer = conn.remote_address();
    let Ok(mut h3) = h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn)).await
    else {
        return;
    };
    let mut streams = JoinSet::new();
    loop {
        let resolver = tokio::select! {
            r = h3.accept() => match r {
                Ok(Some(r)) => r,
                _ => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let log = log.clone();
        streams.spawn(async move {
            let Ok((req, mut stream)) = resolver.resolve_request().await else {
                return;
            };

            let path = req.uri().path().to_string();
            let (status, body) = route(req.method(), &path);
            let content_type = content_type(&path);
            log.push(SeenRequest {
                peer,
                version: http::Version::HTTP_3,
                method: req.method().clone(),
                path,
                status: status.as_u16(),
            });
            let resp = http::Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, content_type)
                .body(())
                .unwrap();
            if stream.send_response(resp).await.is_err() {
                return;
            }
            if !body.is_empty() && stream.send_data(body).await.is_err() {
                return;
            }
            let _ = stream.finish().await;
            // Read the request to its end before dropping the stream: quinn answers an unread
            // receive side with STOP_SENDING(0), which curl reports as a stream reset.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(Some(_)) = stream.recv_data().await {}
            })
            .await;
        });
    }
    // Let in-flight responses finish (bounded), then the connection closes with `h3`.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while streams.join_next().await.is_some() {}
    })
    .await;
}

/// Hex of a SHA-256 (for messages and for the Python clients' `--expect-body-sha256`).
pub fn hex_sha256(digest: &[u8; 32]) -> String {
    hex::encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    fn lo4() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn lo6() -> SocketAddr {
        "[::1]:0".parse().unwrap()
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn pattern_is_position_addressable_and_stable() {
        let whole = pattern_bytes(7, 0, 100);
        assert_eq!(&pattern_bytes(7, 13, 50)[..], &whole[13..63]);
        assert_ne!(pattern_bytes(1, 0, 16), pattern_bytes(2, 0, 16));
        // Pinned so the Python twin (interop/pattern.py) can be checked against it.
        assert_eq!(
            hex::encode(pattern_bytes(0, 0, 8)),
            hex::encode(splitmix64(0, 0).to_le_bytes())
        );
        assert_eq!(
            pattern_sha256(3, 200_000),
            <[u8; 32]>::from(Sha256::digest(pattern_bytes(3, 0, 200_000)))
        );
    }

    #[tokio::test]
    async fn tcp_echo_roundtrip_with_half_close() {
        let echo = TcpEcho::start(lo4()).await;
        let mut c = TcpStream::connect(echo.addr()).await.unwrap();
        let data = pattern_bytes(9, 0, 300_000);
        let (mut rd, mut wr) = c.split();
        let write = async {
            wr.write_all(&data).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let read = tokio::time::timeout(T, rd.read_to_end(&mut back));
        let ((), r) = tokio::join!(write, read);
        r.expect("echo FIN after the client's FIN").unwrap();
        assert!(back == data, "echo must return the bytes unchanged");
        assert_eq!(echo.peers(), vec![c.local_addr().unwrap()]);
    }

    #[tokio::test]
    async fn tcp_echo_on_ipv6_loopback() {
        let echo = TcpEcho::start(lo6()).await;
        let mut c = TcpStream::connect(echo.addr()).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(T, c.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"ping");
    }

    #[tokio::test]
    #[should_panic(expected = "loopback only")]
    async fn origins_refuse_non_loopback_bind() {
        TcpEcho::start("0.0.0.0:0".parse().unwrap()).await;
    }

    #[tokio::test]
    async fn udp_echo_echoes_every_datagram_including_empty() {
        let echo = UdpEcho::start(lo4()).await;
        let c = UdpSocket::bind(lo4()).await.unwrap();
        c.connect(echo.addr()).await.unwrap();
        let mut buf = vec![0u8; 2000];
        for size in [0usize, 10, 1200] {
            let p = pattern_bytes(size as u64, 0, size);
            c.send(&p).await.unwrap();
            let n = tokio::time::timeout(T, c.recv(&mut buf))
                .await
                .expect("echo within 10 s")
                .unwrap();
            assert_eq!(
                &buf[..n],
                &p[..],
                "payload of {size} bytes echoed unchanged"
            );
        }
        assert_eq!(echo.count(), 3);
        assert_eq!(echo.peers(), vec![c.local_addr().unwrap()]);
    }

    #[tokio::test]
    async fn tls_sink_roundtrip_reports_matching_hashes() {
        let sink = TlsSink::start(lo4(), 1 << 20).await;
        let tcp = TcpStream::connect(sink.addr()).await.unwrap();
        let client = tls_client_roundtrip(tcp, "localhost", dev_pki().roots(), 1 << 20, 1 << 20)
            .await
            .unwrap();
        let server = sink
            .wait_session(0, T)
            .await
            .expect("server session recorded");
        assert_eq!(client.sent_sha256, server.received_sha256);
        assert_eq!(client.received_sha256, server.sent_sha256);
        assert_eq!(client.sent_sha256, pattern_sha256(TLS_UPLOAD_SEED, 1 << 20));
        assert_eq!(
            server.sent_sha256,
            pattern_sha256(TLS_DOWNLOAD_SEED, 1 << 20)
        );
        assert!(sink.errors().is_empty(), "{:?}", sink.errors());
    }

    #[tokio::test]
    async fn recording_tcp_records_client_hello_extensions() {
        let rec = RecordingTcp::start(lo4(), &b"not TLS"[..]).await;
        let tcp = TcpStream::connect(rec.addr()).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(dev_pki().client_config(&[])));
        // The reply is garbage, so the handshake fails; the ClientHello is recorded regardless.
        let _ = tokio::time::timeout(
            T,
            connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await;
        let r = rec.wait_recording(0, 1, T).await.expect("one connection");
        let r = rec
            .wait_recording(0, usize::MAX, T)
            .await
            .filter(|r| r.closed)
            .unwrap_or(r);
        let exts = client_hello_extensions(&r.bytes).expect("a ClientHello");
        assert!(exts.contains(&43), "supported_versions in {exts:?}");
        assert_eq!(r.sha256, <[u8; 32]>::from(Sha256::digest(&r.bytes)));
    }

    async fn https_get(
        origin: &HttpsOrigin,
        path: &str,
        alpn: &[u8],
    ) -> (http::Response<()>, Bytes) {
        use http_body_util::BodyExt;
        let tcp = TcpStream::connect(origin.addr()).await.unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(dev_pki().client_config(&[alpn])));
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let io = TokioIo::new(tls);
        let req = http::Request::get(format!("https://localhost{path}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = if alpn == b"h2" {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let mut req = req;
            *req.uri_mut() = path.parse().unwrap();
            req.headers_mut()
                .insert(http::header::HOST, "localhost".parse().unwrap());
            send.send_request(req).await.unwrap()
        };
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(T, body.collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        (http::Response::from_parts(parts, ()), body)
    }

    #[tokio::test]
    async fn https_origin_serves_routes_over_h1_and_h2() {
        let origin = HttpsOrigin::start(lo4()).await;
        let pem = std::fs::read_to_string(origin.ca_pem_path()).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
        let (resp, body) = https_get(&origin, "/", b"http/1.1").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(&body[..], ROOT_BODY);
        let (resp, body) = https_get(&origin, "/bytes/100000", b"h2").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(&body)),
            pattern_sha256(BYTES_ROUTE_SEED, 100_000)
        );
        let (resp, _) = https_get(&origin, "/nope", b"h2").await;
        assert_eq!(resp.status(), 404);
        let seen: Vec<_> = origin.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(seen, ["/", "/bytes/100000", "/nope"]);
    }

    #[tokio::test]
    async fn h3_origin_serves_routes() {
        let origin = H3Origin::start(lo4()).await;
        let mut client = quinn::Endpoint::client(lo4()).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(
            dev_pki().client_config(&[b"h3"]),
        ))
        .unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = tokio::time::timeout(T, client.connect(origin.addr(), "localhost").unwrap())
            .await
            .unwrap()
            .unwrap();
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .unwrap();
        let drive = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        for (path, want) in [
            ("/", Bytes::from_static(ROOT_BODY)),
            (
                "/bytes/70000",
                pattern_bytes(BYTES_ROUTE_SEED, 0, 70_000).into(),
            ),
            (
                "/page/n0nce-1.html",
                marker_page_html("n0nce-1").unwrap().into(),
            ),
        ] {
            let req = http::Request::get(format!("https://localhost{path}"))
                .body(())
                .unwrap();
            let mut stream = send.send_request(req).await.unwrap();
            stream.finish().await.unwrap();
            let resp = tokio::time::timeout(T, stream.recv_response())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(resp.status(), 200, "GET {path}");
            // Browsers render only `text/html`; the octet-stream routes are downloads.
            let html = resp.headers()[http::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html");
            assert_eq!(html, path.ends_with(".html"), "GET {path}: content-type");
            let mut body = Vec::new();
            while let Some(mut chunk) = tokio::time::timeout(T, stream.recv_data())
                .await
                .unwrap()
                .unwrap()
            {
                while chunk.has_remaining() {
                    let c = chunk.chunk();
                    body.extend_from_slice(c);
                    let n = c.len();
                    chunk.advance(n);
                }
            }
            assert!(body == want[..], "GET {path}: body differs");
        }
        assert_eq!(origin.requests().len(), 3);
        drive.abort();
        client.close(0u32.into(), b"done");
    }

    #[test]
    fn marker_pages_take_only_plain_markers() {
        let page = marker_page_html("abc-123").unwrap();
        assert!(page.contains(r#"<p id="marker">abc-123</p>"#), "{page}");
        for bad in ["", "a<b", "a/b", "a b", &"x".repeat(MAX_PAGE_MARKER + 1)] {
            assert_eq!(marker_page_html(bad), None, "{bad:?}");
        }
        assert_eq!(
            route(&http::Method::GET, "/page/a%3Cb.html").0,
            http::StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn dropping_an_origin_stops_it() {
        let echo = TcpEcho::start(lo4()).await;
        let addr = echo.addr();
        drop(echo);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener closed on drop"
        );
    }
}
