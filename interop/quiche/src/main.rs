//! A MASQUE client on cloudflare/quiche, independent of cfr's own h3/quinn stack, for the interop
//! matrix (`interop/run`). One JSON result line on stdout; exit 0 if every check held, 1 if not,
//! 2 on usage errors. Every wait is bounded (`--timeout` per wait, `--deadline` for the process).
//!
//! ```text
//! cfr-interop-quiche --relay 127.0.0.1:4433 --ca certs/ca.pem --token T udp-echo --target 127.0.0.1:9000
//! ```
//! Subcommands:
//! * `udp-echo --target H:P [--sizes 0,10,1200] [--count N] [--capsules]` — CONNECT-UDP (RFC 9298)
//! * `tcp-echo --target H:P [--bytes N]` — classic CONNECT (RFC 9114 §4.4), SHA-256 both ways
//! * `parallel --target H:P [--tunnels 100] [--bytes N]` — N classic CONNECT tunnels at once
//! * `expect-status --status N [--authority A] [--protocol P] [--scheme S] [--path P]
//!   [--no-authority] [--proxy-status-error E] [--or-reset CODE]` — crafted request, status check
//! * `tcp-send --target H:P --hex-file F` — classic CONNECT, send the file's bytes, FIN, read to
//!   the end; reports SHA-256 of both directions (the runner compares with the destination)
//! * `malformed --tcp-target H:P --udp-target H:P` — h3i cases, one JSON row per case (malformed.rs)
mod malformed;

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use quiche::h3::NameValue;
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{json, Value};

const USAGE: &str = "usage: cfr-interop-quiche --relay HOST:PORT --ca FILE [--token T] \
[--server-name NAME] [--timeout SECS] [--deadline SECS] \
(udp-echo|tcp-echo|tcp-send|parallel|expect-status|malformed) [subcommand flags]";

/// Largest UDP payload a QUIC packet of ours may have. Loopback carries far more; 1452 fits a
/// 1500-byte Ethernet MTU and leaves room for a 1200-byte UDP payload in a QUIC DATAGRAM frame.
const MAX_SEND_UDP: usize = 1452;

type Checked = Result<Value, String>;

/// Global flags.
#[derive(Clone)]
pub struct Opts {
    pub relay: SocketAddr,
    /// `host:port` as written, for `:authority` of extended CONNECT (RFC 9298 §3).
    pub relay_authority: String,
    /// TLS SNI and the name verified against the certificate.
    pub server_name: String,
    pub ca: Option<String>,
    pub token: Option<String>,
    pub timeout: Duration,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (opts, cmd, rest, deadline) = match parse_global(&argv) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Hard bound on the whole process, whatever a peer does.
    let cmd_name = cmd.clone();
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        println!(
            "{}",
            json!({"client":"quiche","command":cmd_name,"ok":false,
                   "detail":format!("deadline of {}s exceeded", deadline.as_secs())})
        );
        std::process::exit(1);
    });
    let start = Instant::now();
    if cmd == "malformed" {
        return malformed::run(&opts, &rest);
    }
    let result = match cmd.as_str() {
        "udp-echo" => udp_echo(&opts, &rest),
        "tcp-echo" => tcp_echo(&opts, &rest),
        "parallel" => parallel(&opts, &rest),
        "expect-status" => expect_status(&opts, &rest),
        "tcp-send" => tcp_send(&opts, &rest),
        other => {
            eprintln!("unknown subcommand {other}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let (ok, detail) = match result {
        Ok(v) => (true, v),
        Err(e) => (false, Value::String(e)),
    };
    println!(
        "{}",
        json!({"client":"quiche","command":cmd,"ok":ok,"detail":detail,"elapsed_ms":elapsed_ms})
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

type Global = (Opts, String, Vec<String>, Duration);

fn parse_global(argv: &[String]) -> Result<Global, String> {
    let mut relay = None;
    let mut ca = None;
    let mut token = None;
    let mut server_name = None;
    let mut timeout = 10.0f64;
    let mut deadline = 120.0f64;
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        if !a.starts_with("--") {
            let cmd = a.clone();
            let rest = argv[i + 1..].to_vec();
            let relay_authority: String = relay.ok_or("--relay is required")?;
            let addr = relay_authority
                .to_socket_addrs()
                .map_err(|e| format!("--relay {relay_authority}: {e}"))?
                .next()
                .ok_or_else(|| format!("--relay {relay_authority}: no address"))?;
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "--relay {addr}: interop tests run on loopback only"
                ));
            }
            let host = split_host_port(&relay_authority)?.0;
            // An IP literal cannot be checked as a DNS name; cfr's dev certificate is for localhost.
            let server_name =
                server_name.unwrap_or_else(|| match host.parse::<std::net::IpAddr>() {
                    Ok(_) => "localhost".to_string(),
                    Err(_) => host.clone(),
                });
            let opts = Opts {
                relay: addr,
                relay_authority,
                server_name,
                ca,
                token,
                timeout: Duration::from_secs_f64(timeout),
            };
            return Ok((opts, cmd, rest, Duration::from_secs_f64(deadline)));
        }
        let v = argv
            .get(i + 1)
            .ok_or_else(|| format!("{a} needs a value"))?
            .clone();
        match a.as_str() {
            "--relay" => relay = Some(v),
            "--ca" => ca = Some(v),
            "--token" => token = Some(v),
            "--server-name" => server_name = Some(v),
            "--timeout" => timeout = v.parse().map_err(|_| format!("--timeout {v}"))?,
            "--deadline" => deadline = v.parse().map_err(|_| format!("--deadline {v}"))?,
            _ => return Err(format!("unknown flag {a}")),
        }
        i += 2;
    }
    Err("missing subcommand".into())
}

/// Subcommand flags: `--name value` pairs and bare `--switch`es.
struct Flags(HashMap<String, Option<String>>);

impl Flags {
    fn parse(rest: &[String], switches: &[&str]) -> Result<Flags, String> {
        let mut m = HashMap::new();
        let mut i = 0;
        while i < rest.len() {
            let name = rest[i]
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {}", rest[i]))?;
            if switches.contains(&name) {
                m.insert(name.to_string(), None);
                i += 1;
            } else {
                let v = rest
                    .get(i + 1)
                    .ok_or_else(|| format!("--{name} needs a value"))?;
                m.insert(name.to_string(), Some(v.clone()));
                i += 2;
            }
        }
        Ok(Flags(m))
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(|v| v.as_deref())
    }
    fn has(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
    fn req(&self, k: &str) -> Result<&str, String> {
        self.get(k).ok_or_else(|| format!("--{k} is required"))
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{k} {v}: not a number")),
        }
    }
}

/// `HOST:PORT` or `[V6]:PORT` → (host without brackets, port).
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s}: expected HOST:PORT"))?;
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    let port = p.parse().map_err(|_| format!("{s}: bad port"))?;
    Ok((h.to_string(), port))
}

/// RFC 9298 §2: default URI template; IPv6 literals percent-encode their colons.
pub fn connect_udp_path(host: &str, port: u16) -> String {
    format!(
        "/.well-known/masque/udp/{}/{port}/",
        host.replace(':', "%3A")
    )
}

pub fn varint(v: u64, out: &mut Vec<u8>) {
    match v {
        0..=63 => out.push(v as u8),
        64..=16383 => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        16384..=1_073_741_823 => out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// Decodes a QUIC varint; `None` if `b` is too short.
pub fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    if b.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for x in &b[1..len] {
        v = (v << 8) | u64::from(*x);
    }
    Some((v, len))
}

/// DATAGRAM capsule (RFC 9297 §3.5) with context ID 0 (RFC 9298 §4): a UDP payload.
pub fn udp_capsule(payload: &[u8]) -> Vec<u8> {
    let mut c = vec![0x00];
    varint(1 + payload.len() as u64, &mut c);
    c.push(0x00);
    c.extend_from_slice(payload);
    c
}

fn hex_sha256(b: &[u8]) -> String {
    digest(&SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Deterministic test bytes (not a repeating short cycle, so reordering would show).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What the relay sent on one request stream.
#[derive(Default, Debug)]
struct StreamState {
    headers: Option<Vec<(String, String)>>,
    body: Vec<u8>,
    fin: bool,
    reset: Option<u64>,
}

impl StreamState {
    fn status(&self) -> Option<u16> {
        self.header(":status")?.parse().ok()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .as_ref()?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn ended(&self) -> bool {
        self.fin || self.reset.is_some()
    }
}

/// One QUIC + HTTP/3 connection to the relay, driven synchronously.
struct Session {
    opts: Opts,
    sock: UdpSocket,
    local: SocketAddr,
    conn: quiche::Connection,
    h3: quiche::h3::Connection,
    streams: HashMap<u64, StreamState>,
    /// Received HTTP datagrams by quarter stream ID: context ID + payload.
    datagrams: HashMap<u64, VecDeque<Vec<u8>>>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Session {
    fn connect(opts: &Opts, h3_datagram: bool) -> Result<Session, String> {
        let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| e.to_string())?;
        cfg.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
            .map_err(|e| e.to_string())?;
        match &opts.ca {
            Some(ca) => {
                cfg.load_verify_locations_from_file(ca)
                    .map_err(|e| format!("--ca {ca}: {e}"))?;
                cfg.verify_peer(true);
            }
            None => cfg.verify_peer(false),
        }
        cfg.set_max_idle_timeout(30_000);
        cfg.set_max_recv_udp_payload_size(65_527);
        cfg.set_max_send_udp_payload_size(MAX_SEND_UDP);
        cfg.set_initial_max_data(64 << 20);
        cfg.set_initial_max_stream_data_bidi_local(16 << 20);
        cfg.set_initial_max_stream_data_bidi_remote(1 << 20);
        cfg.set_initial_max_stream_data_uni(1 << 20);
        cfg.set_initial_max_streams_bidi(256);
        cfg.set_initial_max_streams_uni(16);
        cfg.set_disable_active_migration(true);
        if h3_datagram {
            // Advertises max_datagram_frame_size (RFC 9221); quiche's h3 layer then sends
            // SETTINGS_H3_DATAGRAM=1 (RFC 9297 §2.1.1).
            cfg.enable_dgram(true, 4096, 4096);
        }
        let bind: SocketAddr = if opts.relay.is_ipv6() {
            "[::1]:0".parse().unwrap()
        } else {
            "127.0.0.1:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
        let local = sock.local_addr().map_err(|e| e.to_string())?;
        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        SystemRandom::new()
            .fill(&mut scid)
            .map_err(|_| "rng failed".to_string())?;
        let scid = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::connect(Some(&opts.server_name), &scid, local, opts.relay, &mut cfg)
            .map_err(|e| format!("quiche::connect: {e}"))?;

        let mut conn = conn;
        let mut buf = vec![0; 65_535];
        let mut out = vec![0; MAX_SEND_UDP];
        let deadline = Instant::now() + opts.timeout;
        while !conn.is_established() {
            if conn.is_closed() {
                return Err(format!(
                    "QUIC handshake failed: local={:?} peer={:?}",
                    conn.local_error(),
                    conn.peer_error()
                ));
            }
            if Instant::now() > deadline {
                return Err("QUIC handshake timed out".into());
            }
            io(
                &sock,
                local,
                &mut conn,
                &mut buf,
                &mut out,
                Duration::from_millis(50),
            )?;
        }
        let mut h3cfg = quiche::h3::Config::new().map_err(|e| e.to_string())?;
        h3cfg.enable_extended_connect(true);
        let h3 = quiche::h3::Connection::with_transport(&mut conn, &h3cfg)
            .map_err(|e| format!("HTTP/3 setup: {e}"))?;
        let mut s = Session {
            opts: opts.clone(),
            sock,
            local,
            conn,
            h3,
            streams: HashMap::new(),
            datagrams: HashMap::new(),
            buf,
            out,
        };
        // The relay's SETTINGS must arrive before an extended CONNECT (RFC 9220 §3).
        s.run_until(
            |s| s.h3.extended_connect_enabled_by_peer(),
            "relay SETTINGS",
        )?;
        Ok(s)
    }

    fn io(&mut self, max_wait: Duration) -> Result<(), String> {
        io(
            &self.sock,
            self.local,
            &mut self.conn,
            &mut self.buf,
            &mut self.out,
            max_wait,
        )
    }

    fn flush(&mut self) -> Result<(), String> {
        flush(&self.sock, &mut self.conn, &mut self.out)
    }

    /// Drains HTTP/3 events and QUIC datagrams into `streams` / `datagrams`.
    fn poll(&mut self) -> Result<(), String> {
        loop {
            match self.h3.poll(&mut self.conn) {
                Ok((sid, quiche::h3::Event::Headers { list, .. })) => {
                    let hs = list
                        .iter()
                        .map(|h| {
                            (
                                String::from_utf8_lossy(h.name()).into_owned(),
                                String::from_utf8_lossy(h.value()).into_owned(),
                            )
                        })
                        .collect();
                    self.streams.entry(sid).or_default().headers = Some(hs);
                }
                Ok((sid, quiche::h3::Event::Data)) => loop {
                    match self.h3.recv_body(&mut self.conn, sid, &mut self.buf) {
                        Ok(n) => self
                            .streams
                            .entry(sid)
                            .or_default()
                            .body
                            .extend_from_slice(&self.buf[..n]),
                        Err(quiche::h3::Error::Done) => break,
                        Err(e) => return Err(format!("recv_body on stream {sid}: {e}")),
                    }
                },
                Ok((sid, quiche::h3::Event::Finished)) => {
                    self.streams.entry(sid).or_default().fin = true
                }
                Ok((sid, quiche::h3::Event::Reset(code))) => {
                    self.streams.entry(sid).or_default().reset = Some(code)
                }
                Ok(_) => {}
                Err(quiche::h3::Error::Done) => break,
                Err(e) => return Err(format!("HTTP/3 connection error: {e}")),
            }
        }
        while let Ok(n) = self.conn.dgram_recv(&mut self.buf) {
            if let Some((qsid, used)) = read_varint(&self.buf[..n]) {
                self.datagrams
                    .entry(qsid)
                    .or_default()
                    .push_back(self.buf[used..n].to_vec());
            }
        }
        Ok(())
    }

    /// Drives the connection until `done` holds, bounded by the per-wait timeout.
    fn run_until(
        &mut self,
        mut done: impl FnMut(&mut Session) -> bool,
        what: &str,
    ) -> Result<(), String> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            self.poll()?;
            if done(self) {
                return Ok(());
            }
            if self.conn.is_closed() {
                return Err(format!(
                    "connection closed while waiting for {what}: local={:?} peer={:?}",
                    self.conn.local_error(),
                    self.conn.peer_error()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "timed out after {:?} waiting for {what}",
                    self.opts.timeout
                ));
            }
            self.io(Duration::from_millis(50))?;
        }
    }

    fn auth(&self, hs: &mut Vec<quiche::h3::Header>) {
        if let Some(t) = &self.opts.token {
            hs.push(quiche::h3::Header::new(
                b"proxy-authorization",
                format!("Bearer {t}").as_bytes(),
            ));
        }
    }

    /// Sends a request (retrying while the stream limit or flow control blocks it).
    fn request(&mut self, headers: &[quiche::h3::Header], fin: bool) -> Result<u64, String> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            match self.h3.send_request(&mut self.conn, headers, fin) {
                Ok(sid) => {
                    self.streams.insert(sid, StreamState::default());
                    self.flush()?;
                    return Ok(sid);
                }
                Err(quiche::h3::Error::StreamBlocked)
                | Err(quiche::h3::Error::TransportError(quiche::Error::StreamLimit)) => {
                    if Instant::now() > deadline {
                        return Err("no request stream available in time".into());
                    }
                    self.io(Duration::from_millis(20))?;
                    self.poll()?;
                }
                Err(e) => return Err(format!("send_request: {e}")),
            }
        }
    }

    fn classic_connect(&mut self, authority: &str) -> Result<u64, String> {
        // RFC 9114 §4.4: only :method and :authority.
        let mut hs = vec![
            quiche::h3::Header::new(b":method", b"CONNECT"),
            quiche::h3::Header::new(b":authority", authority.as_bytes()),
        ];
        self.auth(&mut hs);
        self.request(&hs, false)
    }

    fn connect_udp(&mut self, host: &str, port: u16) -> Result<u64, String> {
        // RFC 9298 §3 + RFC 9220: extended CONNECT with the default URI template.
        let path = connect_udp_path(host, port);
        let mut hs = vec![
            quiche::h3::Header::new(b":method", b"CONNECT"),
            quiche::h3::Header::new(b":protocol", b"connect-udp"),
            quiche::h3::Header::new(b":scheme", b"https"),
            quiche::h3::Header::new(b":authority", self.opts.relay_authority.as_bytes()),
            quiche::h3::Header::new(b":path", path.as_bytes()),
            quiche::h3::Header::new(b"capsule-protocol", b"?1"),
        ];
        self.auth(&mut hs);
        self.request(&hs, false)
    }

    /// Waits for the response head; `Err` unless it is 2xx.
    fn await_2xx(&mut self, sid: u64) -> Result<(), String> {
        self.run_until(
            |s| s.streams[&sid].headers.is_some() || s.streams[&sid].reset.is_some(),
            "response headers",
        )?;
        let st = &self.streams[&sid];
        match st.status() {
            Some(c) if (200..300).contains(&c) => Ok(()),
            Some(c) => Err(format!(
                "status {c} (proxy-status: {})",
                st.header("proxy-status").unwrap_or("-")
            )),
            None => Err(format!(
                "stream reset with 0x{:x} before a response",
                st.reset.unwrap_or(0)
            )),
        }
    }

    /// Writes `data` fully (or as much as fits before the wait bound) on a request stream.
    fn send_all(&mut self, sid: u64, data: &[u8], fin: bool) -> Result<(), String> {
        let mut off = 0;
        let deadline = Instant::now() + self.opts.timeout;
        while off < data.len() {
            match self.h3.send_body(&mut self.conn, sid, &data[off..], false) {
                Ok(n) => off += n,
                Err(quiche::h3::Error::Done) => {}
                Err(e) => return Err(format!("send_body: {e}")),
            }
            if off < data.len() {
                if Instant::now() > deadline {
                    return Err(format!("send blocked after {off} of {} bytes", data.len()));
                }
                self.io(Duration::from_millis(20))?;
                self.poll()?;
            }
        }
        if fin {
            self.conn
                .stream_send(sid, b"", true)
                .map_err(|e| format!("FIN: {e}"))?;
        }
        self.flush()
    }
}

/// Sends what quiche has, waits up to `max_wait` for packets, feeds them to quiche.
fn io(
    sock: &UdpSocket,
    local: SocketAddr,
    conn: &mut quiche::Connection,
    buf: &mut [u8],
    out: &mut [u8],
    max_wait: Duration,
) -> Result<(), String> {
    flush(sock, conn, out)?;
    let wait = conn
        .timeout()
        .map_or(max_wait, |t| t.min(max_wait))
        .max(Duration::from_millis(1));
    sock.set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    let mut got = false;
    loop {
        match sock.recv_from(buf) {
            Ok((n, from)) => {
                got = true;
                let info = quiche::RecvInfo { from, to: local };
                // A packet quiche rejects is dropped, like any stray datagram.
                let _ = conn.recv(&mut buf[..n], info);
                sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break
            }
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    sock.set_nonblocking(false).map_err(|e| e.to_string())?;
    if !got || conn.timeout() == Some(Duration::ZERO) {
        conn.on_timeout();
    }
    flush(sock, conn, out)
}

fn flush(sock: &UdpSocket, conn: &mut quiche::Connection, out: &mut [u8]) -> Result<(), String> {
    loop {
        match conn.send(out) {
            Ok((n, info)) => {
                sock.send_to(&out[..n], info.to)
                    .map_err(|e| format!("send: {e}"))?;
            }
            Err(quiche::Error::Done) => return Ok(()),
            Err(e) => return Err(format!("quiche send: {e}")),
        }
    }
}

// --- subcommands ---------------------------------------------------------------------------------

fn udp_echo(opts: &Opts, rest: &[String]) -> Checked {
    let f = Flags::parse(rest, &["capsules"])?;
    let (host, port) = split_host_port(f.req("target")?)?;
    let sizes: Vec<usize> = f
        .get("sizes")
        .unwrap_or("0,10,1200")
        .split(',')
        .map(|s| s.trim().parse().map_err(|_| format!("--sizes: {s}")))
        .collect::<Result<_, _>>()?;
    let count: usize = f.num("count", 1)?;
    let capsules = f.has("capsules");
    let per_wait = Duration::from_secs_f64(f.num("datagram-timeout", 2.0)?);
    let retries: usize = f.num("retries", 3)?;

    let mut s = Session::connect(opts, !capsules)?;
    let sid = s.connect_udp(&host, port)?;
    s.await_2xx(sid)?;
    // RFC 9298 §3 / RFC 9297 §3.4: the 2xx carries Capsule-Protocol: ?1.
    let cp = s.streams[&sid]
        .header("capsule-protocol")
        .map(str::to_owned);
    if cp.as_deref() != Some("?1") {
        return Err(format!("2xx without capsule-protocol: ?1 (got {cp:?})"));
    }
    let qsid = sid / 4;
    let via_datagrams = !capsules && s.h3.dgram_enabled_by_peer(&s.conn);
    let mut echoed = 0usize;
    let mut resent = 0usize;
    let mut capsule_buf_off = 0usize;
    for &size in &sizes {
        for n in 0..count {
            let mut payload = pattern(size, (size * 1000 + n) as u64);
            if size >= 4 {
                payload[..4].copy_from_slice(&((size * 1000 + n) as u32).to_be_bytes());
            }
            let mut got = false;
            for attempt in 0..=retries {
                if attempt > 0 {
                    resent += 1;
                }
                if via_datagrams {
                    let mut d = Vec::with_capacity(size + 10);
                    varint(qsid, &mut d);
                    d.push(0x00); // context ID 0: UDP payload (RFC 9298 §4)
                    d.extend_from_slice(&payload);
                    s.conn.dgram_send(&d).map_err(|e| {
                        format!(
                            "dgram_send of a {size}-byte payload: {e} (max writable {:?})",
                            s.conn.dgram_max_writable_len()
                        )
                    })?;
                    s.flush()?;
                } else {
                    s.send_all(sid, &udp_capsule(&payload), false)?;
                }
                let until = Instant::now() + per_wait;
                while Instant::now() < until && !got {
                    s.poll()?;
                    if via_datagrams {
                        if let Some(q) = s.datagrams.get_mut(&qsid) {
                            while let Some(d) = q.pop_front() {
                                if d.first() == Some(&0) && d[1..] == payload[..] {
                                    got = true;
                                }
                            }
                        }
                    } else {
                        // Replies are DATAGRAM capsules on the stream (RFC 9297 §3.5).
                        let body = &s.streams[&sid].body;
                        while let Some((ty, a)) = read_varint(&body[capsule_buf_off..]) {
                            let Some((len, b)) = read_varint(&body[capsule_buf_off + a..]) else {
                                break;
                            };
                            let start = capsule_buf_off + a + b;
                            if body.len() < start + len as usize {
                                break;
                            }
                            let value = &body[start..start + len as usize];
                            if ty == 0 && value.first() == Some(&0) && value[1..] == payload[..] {
                                got = true;
                            }
                            capsule_buf_off = start + len as usize;
                        }
                    }
                    let st = &s.streams[&sid];
                    if st.ended() {
                        return Err(format!(
                            "tunnel ended early (fin={}, reset={:?})",
                            st.fin, st.reset
                        ));
                    }
                    if !got {
                        s.io(Duration::from_millis(20))?;
                    }
                }
                if got {
                    break;
                }
            }
            if !got {
                return Err(format!(
                    "no echo of a {size}-byte payload after {} sends",
                    retries + 1
                ));
            }
            echoed += 1;
        }
    }
    let _ = s.conn.stream_send(sid, b"", true);
    let _ = s.conn.close(true, 0x100, b"done");
    let _ = s.flush();
    Ok(
        json!({"echoed":echoed,"sizes":sizes,"count":count,"resent":resent,
              "transport": if via_datagrams {"quic-datagram"} else {"capsule"}}),
    )
}

fn tcp_echo(opts: &Opts, rest: &[String]) -> Checked {
    let f = Flags::parse(rest, &[])?;
    let target = f.req("target")?.to_string();
    let len: usize = f.num("bytes", 1 << 20)?;
    let data = pattern(len, 3);
    let sent_hash = hex_sha256(&data);
    let mut s = Session::connect(opts, false)?;
    let sid = s.classic_connect(&target)?;
    s.await_2xx(sid)?;
    let start = Instant::now();
    // Write and read interleaved: the echo fills the receive window while we send.
    let mut off = 0;
    let mut fin_sent = false;
    let overall = Instant::now() + opts.timeout * 6;
    let mut last_progress = (Instant::now(), 0usize);
    loop {
        while off < len {
            match s.h3.send_body(&mut s.conn, sid, &data[off..], false) {
                Ok(0) | Err(quiche::h3::Error::Done) => break,
                Ok(n) => off += n,
                Err(e) => return Err(format!("send_body after {off} bytes: {e}")),
            }
        }
        if off == len && !fin_sent {
            // RFC 9114 §4.4: stream FIN ↔ TCP FIN (half-close).
            s.conn
                .stream_send(sid, b"", true)
                .map_err(|e| format!("FIN: {e}"))?;
            fin_sent = true;
        }
        s.io(Duration::from_millis(20))?;
        s.poll()?;
        let st = &s.streams[&sid];
        if let Some(code) = st.reset {
            return Err(format!(
                "stream reset 0x{code:x} after {off} bytes sent, {} received",
                st.body.len()
            ));
        }
        if st.fin {
            break;
        }
        let progress = off + st.body.len();
        if progress != last_progress.1 {
            last_progress = (Instant::now(), progress);
        } else if last_progress.0.elapsed() > opts.timeout {
            return Err(format!(
                "stalled: {off}/{len} sent, {}/{len} echoed",
                st.body.len()
            ));
        }
        if Instant::now() > overall {
            return Err(format!("transfer not done in {:?}", opts.timeout * 6));
        }
        if s.conn.is_closed() {
            return Err(format!("connection closed: peer={:?}", s.conn.peer_error()));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let body = std::mem::take(&mut s.streams.get_mut(&sid).expect("stream").body);
    let got_hash = hex_sha256(&body);
    let _ = s.conn.close(true, 0x100, b"done");
    let _ = s.flush();
    if body.len() != len || got_hash != sent_hash {
        return Err(format!(
            "echo mismatch: sent {len} bytes sha256 {sent_hash}, got {} bytes sha256 {got_hash}",
            body.len()
        ));
    }
    Ok(
        json!({"bytes":len,"sha256":sent_hash,"seconds":(secs * 1000.0).round() / 1000.0,
              "mbit_per_s":((2.0 * len as f64 * 8.0 / secs / 1e6) * 10.0).round() / 10.0}),
    )
}

fn parallel(opts: &Opts, rest: &[String]) -> Checked {
    let f = Flags::parse(rest, &[])?;
    let target = f.req("target")?.to_string();
    let n: usize = f.num("tunnels", 100)?;
    let per: usize = f.num("bytes", 4096)?;
    let mut s = Session::connect(opts, false)?;
    let start = Instant::now();
    let mut tunnels = Vec::with_capacity(n);
    for i in 0..n {
        let sid = s.classic_connect(&target)?;
        let data = pattern(per, 1000 + i as u64);
        tunnels.push((sid, data, 0usize, false));
    }
    let overall = Instant::now() + opts.timeout * 3;
    loop {
        s.poll()?;
        let mut done = 0;
        for (sid, data, off, fin_sent) in tunnels.iter_mut() {
            let st = &s.streams[sid];
            if let Some(code) = st.reset {
                return Err(format!("tunnel on stream {sid} reset 0x{code:x}"));
            }
            match st.status() {
                None => continue,
                Some(c) if !(200..300).contains(&c) => {
                    return Err(format!(
                        "tunnel on stream {sid}: status {c} (proxy-status: {})",
                        st.header("proxy-status").unwrap_or("-")
                    ))
                }
                Some(_) => {}
            }
            if st.fin {
                if st.body != *data {
                    return Err(format!(
                        "tunnel on stream {sid}: echo of {} bytes differs ({} bytes back)",
                        data.len(),
                        st.body.len()
                    ));
                }
                done += 1;
                continue;
            }
            while *off < data.len() {
                match s.h3.send_body(&mut s.conn, *sid, &data[*off..], false) {
                    Ok(0) | Err(quiche::h3::Error::Done) => break,
                    Ok(k) => *off += k,
                    Err(e) => return Err(format!("stream {sid}: send_body: {e}")),
                }
            }
            if *off == data.len() && !*fin_sent {
                s.conn
                    .stream_send(*sid, b"", true)
                    .map_err(|e| format!("FIN: {e}"))?;
                *fin_sent = true;
            }
        }
        if done == n {
            break;
        }
        if Instant::now() > overall {
            return Err(format!(
                "only {done}/{n} tunnels completed in {:?}",
                opts.timeout * 3
            ));
        }
        if s.conn.is_closed() {
            return Err(format!("connection closed: peer={:?}", s.conn.peer_error()));
        }
        s.io(Duration::from_millis(20))?;
    }
    let _ = s.conn.close(true, 0x100, b"done");
    let _ = s.flush();
    Ok(json!({"tunnels":n,"bytes_each":per,"ms":start.elapsed().as_millis() as u64}))
}

fn expect_status(opts: &Opts, rest: &[String]) -> Checked {
    let f = Flags::parse(rest, &["no-authority", "no-token", "udp"])?;
    let want: u16 = f
        .req("status")?
        .parse()
        .map_err(|_| "--status: not a number")?;
    let or_reset: Option<u64> = match f.get("or-reset") {
        None => None,
        Some(v) => Some(
            u64::from_str_radix(v.trim_start_matches("0x"), 16)
                .map_err(|_| format!("--or-reset {v}: hex error code"))?,
        ),
    };
    let mut opts = opts.clone();
    if f.has("no-token") {
        opts.token = None;
    }
    let mut s = Session::connect(&opts, true)?;
    let mut hs = vec![quiche::h3::Header::new(
        b":method",
        f.get("method").unwrap_or("CONNECT").as_bytes(),
    )];
    if let Some(p) = f.get("protocol") {
        hs.push(quiche::h3::Header::new(b":protocol", p.as_bytes()));
    }
    let extended = f.has("protocol") || f.has("path");
    if let Some(sc) = f.get("scheme").or(extended.then_some("https")) {
        hs.push(quiche::h3::Header::new(b":scheme", sc.as_bytes()));
    }
    if !f.has("no-authority") {
        let default = if extended {
            opts.relay_authority.as_str()
        } else {
            f.req("authority")?
        };
        let a = f.get("authority").unwrap_or(default);
        hs.push(quiche::h3::Header::new(b":authority", a.as_bytes()));
    }
    if let Some(p) = f.get("path") {
        hs.push(quiche::h3::Header::new(b":path", p.as_bytes()));
    }
    if f.has("protocol") {
        hs.push(quiche::h3::Header::new(b"capsule-protocol", b"?1"));
    }
    s.auth(&mut hs);
    let sid = s.request(&hs, false)?;
    s.run_until(
        |s| s.streams[&sid].headers.is_some() || s.streams[&sid].reset.is_some(),
        "response or reset",
    )?;
    let st = &s.streams[&sid];
    let proxy_status = st.header("proxy-status").map(str::to_owned);
    let result = match (st.status(), st.reset) {
        (Some(c), _) if c == want => {
            if let Some(e) = f.get("proxy-status-error") {
                let ps = proxy_status.clone().unwrap_or_default();
                if !ps.split(';').any(|p| p.trim() == format!("error={e}")) {
                    return Err(format!(
                        "status {c} as expected but Proxy-Status {ps:?} lacks error={e}"
                    ));
                }
            }
            Ok(json!({"status":c,"proxy_status":proxy_status}))
        }
        (Some(c), _) => Err(format!(
            "status {c}, expected {want} (proxy-status: {})",
            proxy_status.as_deref().unwrap_or("-")
        )),
        (None, Some(code)) if Some(code) == or_reset => Ok(json!({
            "status":null,"reset":format!("0x{code:x}"),
            "note":format!("stream reset 0x{code:x} instead of {want} (accepted by --or-reset)")
        })),
        (None, Some(code)) => Err(format!("stream reset 0x{code:x}, expected status {want}")),
        (None, None) => Err("no response".into()),
    };
    // The connection must survive a refused request (RFC 9114 §8: stream errors stay on the stream).
    if result.is_ok() {
        let mut hs = vec![
            quiche::h3::Header::new(b":method", b"CONNECT"),
            quiche::h3::Header::new(b":authority", b"127.0.0.1:0"),
        ];
        s.auth(&mut hs);
        let probe = s.request(&hs, true)?;
        s.run_until(
            |s| s.streams[&probe].headers.is_some() || s.streams[&probe].reset.is_some(),
            "a second request on the same connection",
        )
        .map_err(|e| format!("connection did not survive the refused request: {e}"))?;
    }
    let _ = s.conn.close(true, 0x100, b"done");
    let _ = s.flush();
    result
}

fn tcp_send(opts: &Opts, rest: &[String]) -> Checked {
    let f = Flags::parse(rest, &[])?;
    let target = f.req("target")?.to_string();
    let file = f.req("hex-file")?;
    let hex = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    let hex = hex.trim();
    let data = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("x"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| format!("{file}: not hex"))?;
    let mut s = Session::connect(opts, false)?;
    let sid = s.classic_connect(&target)?;
    s.await_2xx(sid)?;
    s.send_all(sid, &data, true)?;
    s.run_until(
        |s| s.streams[&sid].ended(),
        "the destination's reply and FIN",
    )?;
    let st = &s.streams[&sid];
    if let Some(code) = st.reset {
        return Err(format!("stream reset 0x{code:x}"));
    }
    let v = json!({"sent_len":data.len(),"sent_sha256":hex_sha256(&data),
                   "received_len":st.body.len(),"received_sha256":hex_sha256(&st.body)});
    let _ = s.conn.close(true, 0x100, b"done");
    let _ = s.flush();
    Ok(v)
}
