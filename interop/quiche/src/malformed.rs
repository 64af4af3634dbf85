//! Malformed HTTP/3 input with h3i (cloudflare/quiche's low-level HTTP/3 client): each case runs on
//! its own QUIC connection, sends what a well-behaved client never sends, then proves the relay's
//! reaction and — where the RFCs keep errors on the stream — that the same connection still carries
//! a fresh UDP tunnel and a fresh TCP tunnel ("probes").
//!
//! h3i verifies no certificate (it has no CA option); the relay is on loopback and the other
//! subcommands do verify it.
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use h3i::actions::h3::{Action, StreamEvent, StreamEventType, WaitType};
use h3i::client::connection_summary::ConnectionSummary;
use h3i::config::Config;
use h3i::frame::H3iFrame;
use quiche::h3::frame::Frame;
use quiche::h3::Header;
use serde_json::json;

use crate::{connect_udp_path, split_host_port, udp_capsule, varint, Flags, Opts};

const H3_NO_ERROR: u64 = 0x100;
const H3_FRAME_UNEXPECTED: u64 = 0x105;
const H3_MESSAGE_ERROR: u64 = 0x10e;
const H3_DATAGRAM_ERROR: u64 = 0x33;

/// What the relay must do with a case's stream.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// A 4xx/5xx status `.0`, or (what h3 0.0.8 does inside the library for malformed request
    /// heads) a reset with H3_MESSAGE_ERROR (RFC 9114 §4.1.2).
    StatusOrMessageError(u16),
    /// The stream is reset with this code (RFC 9297 §3.3: H3_DATAGRAM_ERROR).
    Reset(u64),
    /// 2xx, and the bytes on the stream are exactly these.
    Echo(&'static [u8]),
    /// 2xx, and the body carries this UDP payload as a DATAGRAM capsule with context ID 0.
    UdpEcho(&'static [u8]),
    /// The whole connection is closed with this HTTP/3 error code.
    ConnectionError(u64),
    /// Nothing observable on the case's own streams needs checking (probes decide).
    Nothing,
}

struct Case {
    name: &'static str,
    /// The RFC clause the expectation comes from.
    rule: &'static str,
    /// Request stream the case is about (for `expect`).
    stream: u64,
    actions: Vec<Action>,
    expect: Expect,
    /// Whether the connection must survive (run the probes).
    probes: bool,
    /// Advertise max_datagram_frame_size so the case may send QUIC DATAGRAM frames. SETTINGS_H3_DATAGRAM
    /// is never sent, so the relay answers with capsules, which h3i can observe.
    quic_datagrams: bool,
}

struct Ctx {
    authority: String,
    tcp_target: String,
    udp_host: String,
    udp_port: u16,
    token: Option<String>,
}

impl Ctx {
    fn auth(&self, hs: &mut Vec<Header>) {
        if let Some(t) = &self.token {
            hs.push(Header::new(
                b"proxy-authorization",
                format!("Bearer {t}").as_bytes(),
            ));
        }
    }
    fn classic(&self) -> Vec<Header> {
        let mut hs = vec![
            Header::new(b":method", b"CONNECT"),
            Header::new(b":authority", self.tcp_target.as_bytes()),
        ];
        self.auth(&mut hs);
        hs
    }
    fn udp(&self) -> Vec<Header> {
        let mut hs = vec![
            Header::new(b":method", b"CONNECT"),
            Header::new(b":protocol", b"connect-udp"),
            Header::new(b":scheme", b"https"),
            Header::new(b":authority", self.authority.as_bytes()),
            Header::new(
                b":path",
                connect_udp_path(&self.udp_host, self.udp_port).as_bytes(),
            ),
            Header::new(b"capsule-protocol", b"?1"),
        ];
        self.auth(&mut hs);
        hs
    }
}

fn headers(stream_id: u64, hs: Vec<Header>, fin: bool) -> Action {
    let mut enc = quiche::h3::qpack::Encoder::new();
    let cap = hs
        .iter()
        .map(|h| {
            use quiche::h3::NameValue;
            h.name().len() + h.value().len() + 32
        })
        .sum::<usize>();
    let mut block = vec![0; cap];
    let n = enc.encode(&hs, &mut block).expect("QPACK encode");
    block.truncate(n);
    Action::SendHeadersFrame {
        stream_id,
        fin_stream: fin,
        literal_headers: false,
        headers: hs,
        frame: Frame::Headers {
            header_block: block,
        },
        expected_result: Default::default(),
    }
}

fn data(stream_id: u64, payload: Vec<u8>, fin: bool) -> Action {
    Action::SendFrame {
        stream_id,
        fin_stream: fin,
        frame: Frame::Data { payload },
        expected_result: Default::default(),
    }
}

/// A DATA frame written as raw stream bytes (h3i's frame serialiser has a 64 KiB buffer).
fn raw_data(stream_id: u64, payload: &[u8], fin: bool) -> Action {
    let mut bytes = vec![0x00];
    varint(payload.len() as u64, &mut bytes);
    bytes.extend_from_slice(payload);
    Action::StreamBytes {
        stream_id,
        fin_stream: fin,
        bytes,
        expected_result: Default::default(),
    }
}

fn wait(stream_id: u64, event_type: StreamEventType) -> Action {
    Action::Wait {
        wait_type: WaitType::StreamEvent(StreamEvent {
            stream_id,
            event_type,
        }),
    }
}

fn pause(ms: u64) -> Action {
    Action::Wait {
        wait_type: WaitType::WaitDuration(Duration::from_millis(ms)),
    }
}

/// HTTP datagram (RFC 9297 §2.1): quarter stream ID, context ID, payload.
fn http_datagram(stream_id: u64, context_id: u64, payload: &[u8]) -> Action {
    let mut d = Vec::new();
    varint(stream_id / 4, &mut d);
    varint(context_id, &mut d);
    d.extend_from_slice(payload);
    Action::SendDatagram { payload: d }
}

fn capsule(ty: u64, value: &[u8]) -> Vec<u8> {
    let mut c = Vec::new();
    varint(ty, &mut c);
    varint(value.len() as u64, &mut c);
    c.extend_from_slice(value);
    c
}

fn cases(c: &Ctx) -> Vec<Case> {
    let mut v = Vec::new();

    // RFC 9114 §4.4: a CONNECT request MUST include :authority; §4.1.2: malformed → stream error
    // H3_MESSAGE_ERROR (or a 4xx from the application).
    let mut hs = vec![Header::new(b":method", b"CONNECT")];
    c.auth(&mut hs);
    v.push(Case {
        name: "connect-without-authority",
        rule: "RFC 9114 §4.4, §4.1.2",
        stream: 0,
        actions: vec![headers(0, hs, false), wait(0, StreamEventType::Headers)],
        expect: Expect::StatusOrMessageError(400),
        probes: true,
        quic_datagrams: false,
    });

    // RFC 9220 §4 / RFC 9114 §4.3.1: extended CONNECT needs :scheme and :path.
    let hs: Vec<Header> = c
        .udp()
        .into_iter()
        .filter(|h| {
            use quiche::h3::NameValue;
            h.name() != b":path"
        })
        .collect();
    v.push(Case {
        name: "extended-connect-without-path",
        rule: "RFC 9220 §4, RFC 9114 §4.1.2",
        stream: 0,
        actions: vec![headers(0, hs, false), wait(0, StreamEventType::Headers)],
        expect: Expect::StatusOrMessageError(400),
        probes: true,
        quic_datagrams: false,
    });

    // RFC 9298 §3 / RFC 9220 §3: a :protocol the server does not support → 501 (cfr) or the
    // library's H3_MESSAGE_ERROR reset; never a connection error.
    let hs: Vec<Header> = c
        .udp()
        .into_iter()
        .map(|h| {
            use quiche::h3::NameValue;
            if h.name() == b":protocol" {
                Header::new(b":protocol", b"not-a-known-protocol")
            } else {
                h
            }
        })
        .collect();
    v.push(Case {
        name: "unknown-protocol",
        rule: "RFC 9220 §3, RFC 9114 §4.1.2",
        stream: 0,
        actions: vec![headers(0, hs, false), wait(0, StreamEventType::Headers)],
        expect: Expect::StatusOrMessageError(501),
        probes: true,
        quic_datagrams: false,
    });

    // DATA before the 2xx: the relay connects before answering, so the bytes may only reach the
    // destination after the tunnel is up, and then in order and byte-exact.
    v.push(Case {
        name: "data-before-2xx",
        rule: "RFC 9114 §4.4 (DATA carries the TCP bytes)",
        stream: 0,
        actions: vec![
            headers(0, c.classic(), false),
            data(0, b"early-bytes|".to_vec(), false),
            wait(0, StreamEventType::Headers),
            data(0, b"late-bytes".to_vec(), true),
            wait(0, StreamEventType::Finished),
        ],
        expect: Expect::Echo(b"early-bytes|late-bytes"),
        probes: true,
        quic_datagrams: false,
    });

    // RFC 9297 §2.1: datagrams for a stream that has no tunnel (never opened, or closed) are
    // dropped (or buffered briefly); never a connection error.
    v.push(Case {
        name: "datagram-unknown-and-closed-stream",
        rule: "RFC 9297 §2.1",
        stream: 0,
        actions: vec![
            http_datagram(4000, 0, b"never-opened"),
            http_datagram(40, 0, b"not-yet-opened"),
            headers(0, c.udp(), false),
            wait(0, StreamEventType::Headers),
            Action::StreamBytes {
                stream_id: 0,
                fin_stream: true,
                bytes: vec![],
                expected_result: Default::default(),
            },
            wait(0, StreamEventType::Finished),
            http_datagram(0, 0, b"after-close"),
            pause(200),
        ],
        expect: Expect::Nothing,
        probes: true,
        quic_datagrams: true,
    });

    // RFC 9297 §3.3: a capsule truncated by the end of the stream is an error: abort the stream
    // with H3_DATAGRAM_ERROR.
    v.push(Case {
        name: "truncated-capsule-at-fin",
        rule: "RFC 9297 §3.3",
        stream: 0,
        actions: vec![
            headers(0, c.udp(), false),
            wait(0, StreamEventType::Headers),
            // DATAGRAM capsule announcing 10 bytes, carrying 3, then FIN.
            data(0, vec![0x00, 0x0a, 0x00, b'a', b'b'], true),
            wait(0, StreamEventType::Finished),
        ],
        expect: Expect::Reset(H3_DATAGRAM_ERROR),
        probes: true,
        quic_datagrams: false,
    });

    // RFC 9298 §5 / RFC 9297 §3.5: a DATAGRAM capsule larger than any UDP payload (65527) can
    // carry: cfr bounds capsules and aborts the stream with H3_DATAGRAM_ERROR.
    let mut value = vec![0u8];
    value.extend(std::iter::repeat_n(0x5a, 65_536 + 64));
    v.push(Case {
        name: "oversize-datagram-capsule",
        rule: "RFC 9297 §3.3/§3.5, RFC 9298 §5",
        stream: 0,
        actions: vec![
            headers(0, c.udp(), false),
            wait(0, StreamEventType::Headers),
            raw_data(0, &capsule(0x00, &value), false),
            wait(0, StreamEventType::Finished),
        ],
        expect: Expect::Reset(H3_DATAGRAM_ERROR),
        probes: true,
        quic_datagrams: false,
    });

    // RFC 9298 §4: unknown context IDs are dropped; the tunnel keeps working.
    let mut unknown_ctx = Vec::new();
    varint(7, &mut unknown_ctx);
    unknown_ctx.extend_from_slice(b"ctx-seven");
    v.push(Case {
        name: "unknown-context-ids",
        rule: "RFC 9298 §4",
        stream: 0,
        actions: vec![
            headers(0, c.udp(), false),
            wait(0, StreamEventType::Headers),
            data(0, capsule(0x00, &unknown_ctx), false),
            http_datagram(0, 9, b"ctx-nine"),
            http_datagram(0, 16_384, b"ctx-4-byte-varint"),
            pause(100),
            data(0, udp_capsule(b"after-unknown-ctx"), false),
            wait(0, StreamEventType::Data),
            pause(200),
        ],
        expect: Expect::UdpEcho(b"after-unknown-ctx"),
        probes: true,
        quic_datagrams: true,
    });

    // RFC 9297 §3.2: unknown capsule types are skipped silently.
    v.push(Case {
        name: "unknown-capsule-type",
        rule: "RFC 9297 §3.2",
        stream: 0,
        actions: vec![
            headers(0, c.udp(), false),
            wait(0, StreamEventType::Headers),
            data(
                0,
                capsule(0x17, b"reserved capsule type 0x29*N+0x17"),
                false,
            ),
            data(0, capsule(0x2a_0000, b"large unknown type"), false),
            data(0, udp_capsule(b"after-unknown-capsule"), false),
            wait(0, StreamEventType::Data),
            pause(200),
        ],
        expect: Expect::UdpEcho(b"after-unknown-capsule"),
        probes: true,
        quic_datagrams: false,
    });

    // RFC 9114 §9: unknown frame types on a request stream are ignored.
    v.push(Case {
        name: "unknown-frame-types",
        rule: "RFC 9114 §9, §7.2.8",
        stream: 0,
        actions: vec![
            headers(0, c.classic(), false),
            wait(0, StreamEventType::Headers),
            Action::SendFrame {
                stream_id: 0,
                fin_stream: false,
                frame: Frame::Unknown {
                    raw_type: 0x21,
                    payload: b"grease".to_vec(),
                },
                expected_result: Default::default(),
            },
            data(0, b"hello ".to_vec(), false),
            Action::SendFrame {
                stream_id: 0,
                fin_stream: false,
                frame: Frame::Unknown {
                    raw_type: 0x1f * 1000 + 0x21,
                    payload: vec![0; 300],
                },
                expected_result: Default::default(),
            },
            data(0, b"world".to_vec(), true),
            wait(0, StreamEventType::Finished),
        ],
        expect: Expect::Echo(b"hello world"),
        probes: true,
        quic_datagrams: false,
    });

    // RFC 9114 §7.2.4: SETTINGS on a request stream is a connection error H3_FRAME_UNEXPECTED —
    // the one case here where the connection must NOT survive.
    v.push(Case {
        name: "settings-on-request-stream",
        rule: "RFC 9114 §7.2.4",
        stream: 0,
        actions: vec![
            headers(0, c.classic(), false),
            wait(0, StreamEventType::Headers),
            Action::SendFrame {
                stream_id: 0,
                fin_stream: false,
                frame: settings(),
                expected_result: Default::default(),
            },
            pause(1000),
        ],
        expect: Expect::ConnectionError(H3_FRAME_UNEXPECTED),
        probes: false,
        quic_datagrams: false,
    });
    v
}

fn settings() -> Frame {
    Frame::Settings {
        max_field_section_size: None,
        qpack_max_table_capacity: None,
        qpack_blocked_streams: None,
        connect_protocol_enabled: None,
        h3_datagram: None,
        grease: None,
        additional_settings: None,
        raw: None,
    }
}

/// Client control stream with SETTINGS (RFC 9114 §6.2.1); no SETTINGS_H3_DATAGRAM so replies come
/// as capsules.
fn preamble() -> Vec<Action> {
    vec![
        Action::OpenUniStream {
            stream_id: 2,
            fin_stream: false,
            stream_type: 0x00,
            expected_result: Default::default(),
        },
        Action::SendFrame {
            stream_id: 2,
            fin_stream: false,
            frame: settings(),
            expected_result: Default::default(),
        },
    ]
}

const PROBE_UDP: u64 = 100;
const PROBE_TCP: u64 = 104;

fn probes(c: &Ctx) -> Vec<Action> {
    // One wait at a time, each registered before the event it waits for can happen: h3i's waits
    // do not see events that arrived earlier.
    vec![
        headers(PROBE_UDP, c.udp(), false),
        wait(PROBE_UDP, StreamEventType::Headers),
        data(PROBE_UDP, udp_capsule(b"probe-udp"), false),
        wait(PROBE_UDP, StreamEventType::Data),
        headers(PROBE_TCP, c.classic(), false),
        wait(PROBE_TCP, StreamEventType::Headers),
        data(PROBE_TCP, b"probe-tcp".to_vec(), true),
        wait(PROBE_TCP, StreamEventType::Finished),
    ]
}

/// Status, reset code and body bytes the relay sent on one stream.
#[derive(Debug, Default)]
struct Seen {
    status: Option<u16>,
    reset: Option<u64>,
    body: Vec<u8>,
}

fn seen(s: &ConnectionSummary, stream: u64) -> Seen {
    let mut out = Seen::default();
    for f in s.stream_map.stream(stream) {
        match f {
            H3iFrame::Headers(h) if out.status.is_none() => {
                out.status = h
                    .status_code()
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
            }
            H3iFrame::QuicheH3(Frame::Data { payload }) => out.body.extend_from_slice(&payload),
            H3iFrame::ResetStream(r) => out.reset = Some(r.error_code),
            _ => {}
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn describe(x: &Seen) -> String {
    format!(
        "status={} reset={} body={}B",
        x.status.map_or("-".into(), |s| s.to_string()),
        x.reset.map_or("-".into(), |r| format!("0x{r:x}")),
        x.body.len()
    )
}

fn judge(case: &Case, s: &ConnectionSummary) -> Result<String, String> {
    let x = seen(s, case.stream);
    let peer_err = s
        .conn_close_details
        .peer_error()
        .map(|e| (e.is_app, e.error_code));
    let observed = describe(&x);
    let mut notes = vec![observed.clone()];
    match case.expect {
        Expect::StatusOrMessageError(want) => match (x.status, x.reset) {
            (Some(st), _) if st == want => notes.push(format!("{want} as specified")),
            (Some(st), _) if (400..600).contains(&st) => {
                notes.push(format!("{st} (error status; {want} preferred)"))
            }
            (None, Some(H3_MESSAGE_ERROR)) => {
                notes.push("H3_MESSAGE_ERROR reset (inside h3)".into())
            }
            _ => {
                return Err(format!(
                    "expected {want} or H3_MESSAGE_ERROR reset; got {observed}"
                ))
            }
        },
        Expect::Reset(code) => {
            if x.reset != Some(code) {
                return Err(format!("expected stream reset 0x{code:x}; got {observed}"));
            }
        }
        Expect::Echo(want) => {
            if !matches!(x.status, Some(200..=299)) || x.body != want {
                return Err(format!(
                    "expected 2xx and echo {:?}; got {observed} body {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&x.body)
                ));
            }
            notes.push("byte-exact echo".into());
        }
        Expect::UdpEcho(want) => {
            if !matches!(x.status, Some(200..=299))
                || x.reset.is_some()
                || !contains(&x.body, &udp_capsule(want))
            {
                return Err(format!(
                    "expected the tunnel to echo {:?}; got {observed}",
                    String::from_utf8_lossy(want)
                ));
            }
            notes.push("tunnel survived, echo ok".into());
        }
        Expect::ConnectionError(code) => {
            return match peer_err {
                Some((true, c)) if c == code => {
                    Ok(format!("connection closed with 0x{c:x} as specified"))
                }
                other => Err(format!(
                    "expected connection error 0x{code:x}; got {other:?}"
                )),
            };
        }
        Expect::Nothing => {}
    }
    if case.probes {
        if let Some((app, code)) = peer_err {
            if !(app && code == H3_NO_ERROR) {
                return Err(format!(
                    "relay closed the connection (app={app}, code=0x{code:x}); {observed}"
                ));
            }
        }
        let u = seen(s, PROBE_UDP);
        let t = seen(s, PROBE_TCP);
        if !matches!(u.status, Some(200..=299)) || !contains(&u.body, &udp_capsule(b"probe-udp")) {
            return Err(format!(
                "connection did not carry a new UDP tunnel: {}; {observed}",
                describe(&u)
            ));
        }
        if !matches!(t.status, Some(200..=299)) || t.body != b"probe-tcp" {
            return Err(format!(
                "connection did not carry a new TCP tunnel: {}; {observed}",
                describe(&t)
            ));
        }
        notes.push("connection + new UDP and TCP tunnels ok".into());
    }
    Ok(notes.join("; "))
}

pub fn run(opts: &Opts, rest: &[String]) -> ExitCode {
    let f = match Flags::parse(rest, &[]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("malformed: {e}");
            return ExitCode::from(2);
        }
    };
    let (tcp_target, udp) = match (f.req("tcp-target"), f.req("udp-target")) {
        (Ok(t), Ok(u)) => (t.to_string(), u.to_string()),
        _ => {
            eprintln!("malformed: --tcp-target HOST:PORT and --udp-target HOST:PORT are required");
            return ExitCode::from(2);
        }
    };
    let (udp_host, udp_port) = match split_host_port(&udp) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("malformed: {e}");
            return ExitCode::from(2);
        }
    };
    let only = f.get("case").map(str::to_owned);
    let ctx = Ctx {
        authority: opts.relay_authority.clone(),
        tcp_target,
        udp_host,
        udp_port,
        token: opts.token.clone(),
    };
    let mut failed = 0;
    for case in cases(&ctx) {
        if only.as_deref().is_some_and(|o| o != case.name) {
            continue;
        }
        let start = Instant::now();
        let outcome = run_case(opts, &ctx, &case);
        let (ok, detail) = match outcome {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        if !ok {
            failed += 1;
        }
        println!(
            "{}",
            json!({"client":"quiche-h3i","command":"malformed","case":case.name,"rule":case.rule,
                   "ok":ok,"detail":detail,"elapsed_ms":start.elapsed().as_millis() as u64})
        );
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn run_case(opts: &Opts, ctx: &Ctx, case: &Case) -> Result<String, String> {
    let mut cfg = Config::new()
        .with_host_port(format!("{}:{}", opts.server_name, opts.relay.port()))
        .with_connect_to(opts.relay.to_string())
        .verify_peer(false)
        // Bounds every wait: with nothing arriving for this long the connection ends.
        .with_idle_timeout(4000)
        .with_send_capacity_factor(64.0)
        .with_max_streams_bidi(200)
        .build()
        .map_err(|e| e.to_string())?;
    cfg.enable_dgram = case.quic_datagrams;
    let mut actions = preamble();
    actions.extend(case.actions.iter().cloned());
    if case.probes {
        actions.extend(probes(ctx));
    }
    actions.push(Action::ConnectionClose {
        error: quiche::ConnectionError {
            is_app: true,
            error_code: H3_NO_ERROR,
            reason: vec![],
        },
    });
    // h3i panics on some unexpected conditions: contain it, and bound the whole case.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            h3i::client::sync_client::connect(cfg, actions, None)
        }));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(opts.timeout * 3) {
        Ok(Ok(Ok(summary))) => judge(case, &summary),
        Ok(Ok(Err(e))) => Err(format!("h3i connection failed: {e:?}")),
        Ok(Err(panic)) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            Err(format!("h3i panicked: {msg}"))
        }
        Err(_) => Err(format!("case not finished within {:?}", opts.timeout * 3)),
    }
}
