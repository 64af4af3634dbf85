//! Starts chosen test origins on loopback and prints one JSON line per origin, then
//! `{"ready":true,...}`. Runs until SIGINT/SIGTERM, stdin EOF (with `--until-stdin-eof`) or
//! `--max-secs` (default 900), then prints one JSON summary line per origin of what it saw.
//!
//! ```text
//! cargo run -p cfr-testkit --example origins -- \
//!     --tcp-echo 127.0.0.1:0 --udp-echo 127.0.0.1:0 --https 127.0.0.1:0 --h3 127.0.0.1:0 \
//!     --tls-sink 127.0.0.1:0 --tls-download-len 1048576 --recording 127.0.0.1:0
//! ```
//! Each flag may be repeated. The HTTPS/H3 origins and the TLS sink share one dev CA; its PEM path
//! is in the `ca_pem` field (and stays valid until this process exits).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use cfr_testkit::json_string as js;
use cfr_testkit::origins::{
    client_hello_extensions, dev_pki, hex_sha256, pattern_sha256, H3Origin, HttpsOrigin,
    RecordingTcp, SeenRequest, TcpEcho, TlsSink, UdpEcho, BYTES_ROUTE_SEED,
    TLS_HANDSHAKE_FAILURE_ALERT,
};

const USAGE: &str =
    "usage: origins [--tcp-echo ADDR] [--udp-echo ADDR] [--https ADDR] [--h3 ADDR] \
[--tls-sink ADDR] [--tls-download-len N] [--recording ADDR] [--recording-reply-hex HEX] \
[--max-secs N] [--until-stdin-eof] [--pattern-sha256 N]";

#[derive(Default)]
struct Args {
    tcp_echo: Vec<SocketAddr>,
    udp_echo: Vec<SocketAddr>,
    https: Vec<SocketAddr>,
    h3: Vec<SocketAddr>,
    tls_sink: Vec<SocketAddr>,
    tls_download_len: u64,
    recording: Vec<SocketAddr>,
    recording_reply: Option<Vec<u8>>,
    max_secs: u64,
    until_stdin_eof: bool,
    pattern_sha256: Vec<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        tls_download_len: 1 << 20,
        max_secs: 900,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--until-stdin-eof" {
            a.until_stdin_eof = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let addr = || {
            v.parse::<SocketAddr>()
                .map_err(|e| format!("{flag} {v}: {e}"))
        };
        let num = || v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--tcp-echo" => a.tcp_echo.push(addr()?),
            "--udp-echo" => a.udp_echo.push(addr()?),
            "--https" => a.https.push(addr()?),
            "--h3" => a.h3.push(addr()?),
            "--tls-sink" => a.tls_sink.push(addr()?),
            "--tls-download-len" => a.tls_download_len = num()?,
            "--recording" => a.recording.push(addr()?),
            "--recording-reply-hex" => {
                a.recording_reply = Some(hex::decode(&v).map_err(|e| format!("{flag} {v}: {e}"))?)
            }
            "--max-secs" => a.max_secs = num()?,
            "--pattern-sha256" => a.pattern_sha256.push(num()?),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    for addr in a
        .tcp_echo
        .iter()
        .chain(&a.udp_echo)
        .chain(&a.https)
        .chain(&a.h3)
        .chain(&a.tls_sink)
        .chain(&a.recording)
    {
        if !addr.ip().is_loopback() {
            return Err(format!("{addr}: origins listen on loopback only"));
        }
    }
    Ok(a)
}

fn addrs(v: &[SocketAddr]) -> String {
    let items: Vec<String> = v.iter().map(|a| js(&a.to_string())).collect();
    format!("[{}]", items.join(","))
}

/// `{"summary":KIND,"addr":ADDR,"requests":[...]}`; each request with its HTTP version if `version`.
fn print_requests(kind: &str, addr: SocketAddr, requests: &[SeenRequest], version: bool) {
    let reqs: Vec<String> = requests
        .iter()
        .map(|r| {
            let version = if version {
                format!(r#""version":{},"#, js(&format!("{:?}", r.version)))
            } else {
                String::new()
            };
            format!(
                r#"{{"peer":{},{version}"method":{},"path":{},"status":{}}}"#,
                js(&r.peer.to_string()),
                js(r.method.as_str()),
                js(&r.path),
                r.status
            )
        })
        .collect();
    println!(
        r#"{{"summary":{},"addr":{},"requests":[{}]}}"#,
        js(kind),
        js(&addr.to_string()),
        reqs.join(",")
    );
}

/// `{"origin":KIND,"addr":ADDR}`: an origin without a URL or CA is up.
fn print_origin(kind: &str, addr: SocketAddr) {
    println!(
        r#"{{"origin":{},"addr":{}}}"#,
        js(kind),
        js(&addr.to_string())
    );
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };

    for n in &args.pattern_sha256 {
        println!(
            r#"{{"pattern_sha256":{},"seed":{BYTES_ROUTE_SEED},"len":{n}}}"#,
            js(&hex_sha256(&pattern_sha256(BYTES_ROUTE_SEED, *n)))
        );
    }

    let ca_file = tempfile::tempdir().expect("tempdir");
    let ca_pem = ca_file.path().join("ca.pem");
    std::fs::write(&ca_pem, dev_pki().ca_pem()).expect("write CA PEM");
    let ca = js(&ca_pem.display().to_string());

    let mut tcp = Vec::new();
    for b in &args.tcp_echo {
        let o = TcpEcho::start(*b).await;
        print_origin("tcp-echo", o.addr());
        tcp.push(o);
    }
    let mut udp = Vec::new();
    for b in &args.udp_echo {
        let o = UdpEcho::start(*b).await;
        print_origin("udp-echo", o.addr());
        udp.push(o);
    }
    let mut https = Vec::new();
    for b in &args.https {
        let o = HttpsOrigin::start(*b).await;
        println!(
            r#"{{"origin":"https","addr":{},"url":{},"ca_pem":{ca}}}"#,
            js(&o.addr().to_string()),
            js(&o.url("/"))
        );
        https.push(o);
    }
    let mut h3 = Vec::new();
    for b in &args.h3 {
        let o = H3Origin::start(*b).await;
        println!(
            r#"{{"origin":"h3","addr":{},"url":{},"ca_pem":{ca}}}"#,
            js(&o.addr().to_string()),
            js(&o.url("/"))
        );
        h3.push(o);
    }
    let mut sinks = Vec::new();
    for b in &args.tls_sink {
        let o = TlsSink::start(*b, args.tls_download_len).await;
        println!(
            r#"{{"origin":"tls-sink","addr":{},"download_len":{},"ca_pem":{ca}}}"#,
            js(&o.addr().to_string()),
            args.tls_download_len
        );
        sinks.push(o);
    }
    let mut recs = Vec::new();
    let reply = args
        .recording_reply
        .clone()
        .unwrap_or_else(|| TLS_HANDSHAKE_FAILURE_ALERT.to_vec());
    for b in &args.recording {
        let o = RecordingTcp::start(*b, reply.clone()).await;
        print_origin("recording", o.addr());
        recs.push(o);
    }
    println!(r#"{{"ready":true,"ca_pem":{ca}}}"#);

    let stdin_eof = async {
        if args.until_stdin_eof {
            // A plain thread: tokio's stdin needs a feature the workspace does not enable.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                let _ = tx.send(());
            });
            let _ = rx.await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let why = tokio::select! {
        _ = tokio::signal::ctrl_c() => "sigint",
        _ = term.recv() => "sigterm",
        _ = stdin_eof => "stdin-eof",
        _ = tokio::time::sleep(Duration::from_secs(args.max_secs)) => "max-secs",
    };

    for o in &tcp {
        println!(
            r#"{{"summary":"tcp-echo","addr":{},"peers":{}}}"#,
            js(&o.addr().to_string()),
            addrs(&o.peers())
        );
    }
    for o in &udp {
        println!(
            r#"{{"summary":"udp-echo","addr":{},"count":{},"peers":{}}}"#,
            js(&o.addr().to_string()),
            o.count(),
            addrs(&o.peers())
        );
    }
    for o in &https {
        print_requests("https", o.addr(), &o.requests(), true);
    }
    for o in &h3 {
        print_requests("h3", o.addr(), &o.requests(), false);
    }
    for o in &sinks {
        let sessions: Vec<String> = o
            .sessions()
            .iter()
            .map(|t| {
                format!(
                    r#"{{"peer":{},"received_len":{},"received_sha256":{},"sent_len":{},"sent_sha256":{}}}"#,
                    js(&t.peer.map(|p| p.to_string()).unwrap_or_default()),
                    t.received_len,
                    js(&hex_sha256(&t.received_sha256)),
                    t.sent_len,
                    js(&hex_sha256(&t.sent_sha256))
                )
            })
            .collect();
        let errors: Vec<String> = o.errors().iter().map(|e| js(e)).collect();
        println!(
            r#"{{"summary":"tls-sink","addr":{},"sessions":[{}],"errors":[{}]}}"#,
            js(&o.addr().to_string()),
            sessions.join(","),
            errors.join(",")
        );
    }
    for o in &recs {
        let conns: Vec<String> = o
            .recordings()
            .iter()
            .map(|r| {
                let exts = client_hello_extensions(&r.bytes)
                    .map(|e| {
                        let v: Vec<String> = e.iter().map(|t| t.to_string()).collect();
                        format!("[{}]", v.join(","))
                    })
                    .unwrap_or_else(|| "null".to_string());
                format!(
                    r#"{{"peer":{},"len":{},"sha256":{},"closed":{},"client_hello_extensions":{exts}}}"#,
                    js(&r.peer.to_string()),
                    r.bytes.len(),
                    js(&hex_sha256(&r.sha256)),
                    r.closed
                )
            })
            .collect();
        println!(
            r#"{{"summary":"recording","addr":{},"connections":[{}]}}"#,
            js(&o.addr().to_string()),
            conns.join(",")
        );
    }
    println!(r#"{{"exit":{}}}"#, js(why));
    ExitCode::SUCCESS
}
