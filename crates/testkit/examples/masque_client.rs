//! The in-repo client (`cfr_client`) as a command-line MASQUE client with the same subcommands as
//! `interop/quiche` and `interop/masque_aioquic.py`, so it runs in the same interop matrix. Prints
//! one JSON line; exit 0 if every check held, 1 if not, 2 on usage errors. Every wait is bounded.
//!
//! ```text
//! masque_client --relay 127.0.0.1:4433 --ca certs/ca.pem --token T udp-echo --target 127.0.0.1:9000
//! masque_client ... tcp-echo --target 127.0.0.1:9001 --bytes 10485760
//! masque_client ... parallel --target 127.0.0.1:9001 --tunnels 100
//! masque_client ... expect-status --authority 10.0.0.1:80 --status 403 [--proxy-status-error E]
//! masque_client ... tcp-send --target 127.0.0.1:9002 --hex-file hello.hex
//! masque_client ... expect-status --path /.well-known/masque/udp/127.0.0.1/0/ --status 400
//! ```
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cfr_client::{ClientConfig, ClientError, DatagramMode, RelayClient, Trust};
use cfr_proto::Target;
use cfr_testkit::json_string as js;
use cfr_testkit::origins::pattern_bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USAGE: &str =
    "usage: masque_client --relay HOST:PORT --ca FILE [--token T] [--timeout SECS] \
(udp-echo --target H:P [--sizes 0,10,1200] [--count N] [--capsules] \
| tcp-echo --target H:P [--bytes N] | parallel --target H:P [--tunnels N] [--bytes N] \
| tcp-send --target H:P --hex-file F | expect-status --status N [--authority A] [--path P] [--proxy-status-error E])";

struct Opts {
    relay: String,
    ca: String,
    token: Option<String>,
    timeout: Duration,
    cmd: String,
    flags: HashMap<String, Option<String>>,
}

impl Opts {
    fn get(&self, k: &str) -> Option<&str> {
        self.flags.get(k).and_then(|v| v.as_deref())
    }
    fn req(&self, k: &str) -> Result<&str, String> {
        self.get(k).ok_or_else(|| format!("--{k} is required"))
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        self.get(k).map_or(Ok(default), |v| {
            v.parse().map_err(|_| format!("--{k} {v}: not a number"))
        })
    }
}

fn parse_args() -> Result<Opts, String> {
    const SWITCHES: &[&str] = &["capsules"];
    let mut relay = None;
    let mut ca = None;
    let mut token = None;
    let mut timeout = 10.0f64;
    let mut cmd = None;
    let mut flags = HashMap::new();
    let mut it = std::env::args().skip(1).peekable();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--") else {
            if cmd.is_some() {
                return Err(format!("unexpected argument {a}"));
            }
            cmd = Some(a);
            continue;
        };
        if cmd.is_some() && SWITCHES.contains(&name) {
            flags.insert(name.to_string(), None);
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        match (cmd.is_some(), name) {
            (false, "relay") => relay = Some(v),
            (false, "ca") => ca = Some(v),
            (false, "token") => token = Some(v),
            (false, "timeout") => timeout = v.parse().map_err(|_| format!("--timeout {v}"))?,
            (false, _) => return Err(format!("unknown flag {a}")),
            (true, _) => {
                flags.insert(name.to_string(), Some(v));
            }
        }
    }
    Ok(Opts {
        relay: relay.ok_or("--relay is required")?,
        ca: ca.ok_or("--ca is required")?,
        token,
        timeout: Duration::from_secs_f64(timeout),
        cmd: cmd.ok_or("missing subcommand")?,
        flags,
    })
}

fn target(s: &str) -> Result<Target, String> {
    cfr_proto::target::parse_authority(s).map_err(|e| format!("target {s}: {e:?}"))
}

async fn bounded<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out after {limit:?}")),
    }
}

async fn connect(o: &Opts, mode: DatagramMode) -> Result<RelayClient, String> {
    let mut cfg = ClientConfig::new(
        format!("https://{}", o.relay),
        Trust::CaFile(o.ca.clone().into()),
    );
    cfg.token = o.token.clone();
    cfg.connect_timeout = o.timeout;
    cfg.datagrams = mode;
    bounded(o.timeout, "connect", RelayClient::connect(cfg)).await
}

async fn udp_echo(o: &Opts) -> Result<String, String> {
    let t = target(o.req("target")?)?;
    let sizes: Vec<usize> = o
        .get("sizes")
        .unwrap_or("0,10,1200")
        .split(',')
        .map(|s| s.trim().parse().map_err(|_| format!("--sizes: {s}")))
        .collect::<Result<_, _>>()?;
    let count: usize = o.num("count", 1)?;
    let capsules = o.flags.contains_key("capsules");
    let mode = if capsules {
        DatagramMode::Capsules
    } else {
        DatagramMode::Auto
    };
    let client = connect(o, mode).await?;
    let tunnel = bounded(o.timeout, "CONNECT-UDP", client.connect_udp(&t)).await?;
    let mut resent = 0;
    for &size in &sizes {
        for n in 0..count {
            let payload = pattern_bytes((size * 1000 + n) as u64, 0, size);
            let mut got = false;
            for attempt in 0..4 {
                if attempt > 0 {
                    resent += 1;
                }
                tunnel
                    .send(&payload)
                    .await
                    .map_err(|e| format!("send {size} bytes: {e}"))?;
                let until = Instant::now() + Duration::from_secs(2);
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    match tokio::time::timeout(left, tunnel.recv()).await {
                        Ok(Ok(b)) if b[..] == payload[..] => {
                            got = true;
                            break;
                        }
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => return Err(format!("tunnel ended: {e}")),
                        Err(_) => break,
                    }
                }
                if got {
                    break;
                }
            }
            if !got {
                return Err(format!("no echo of a {size}-byte payload after 4 sends"));
            }
        }
    }
    let transport = if tunnel.uses_quic_datagrams() {
        "quic-datagram"
    } else {
        "capsule"
    };
    client.close();
    Ok(format!(
        r#"{{"echoed":{},"resent":{resent},"transport":{}}}"#,
        sizes.len() * count,
        js(transport)
    ))
}

async fn tcp_echo(o: &Opts) -> Result<String, String> {
    let t = target(o.req("target")?)?;
    let len: usize = o.num("bytes", 1 << 20)?;
    let data = pattern_bytes(3, 0, len);
    let want = hex::encode(Sha256::digest(&data));
    let client = connect(o, DatagramMode::Auto).await?;
    let tunnel = bounded(o.timeout, "CONNECT", client.connect_tcp(&t)).await?;
    let start = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let writer = async {
        wr.write_all(&data).await?;
        // RFC 9114 §4.4: FIN ↔ TCP half-close.
        wr.shutdown().await
    };
    let reader = async {
        let mut back = Vec::with_capacity(len);
        rd.read_to_end(&mut back).await.map(|_| back)
    };
    let limit = o.timeout * 6;
    let (w, r) = tokio::time::timeout(limit, async { tokio::join!(writer, reader) })
        .await
        .map_err(|_| format!("transfer not done in {limit:?}"))?;
    w.map_err(|e| format!("write: {e}"))?;
    let back = r.map_err(|e| format!("read: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    let got = hex::encode(Sha256::digest(&back));
    client.close();
    if back.len() != len || got != want {
        return Err(format!(
            "echo mismatch: sent {len} bytes sha256 {want}, got {} bytes sha256 {got}",
            back.len()
        ));
    }
    Ok(format!(
        r#"{{"bytes":{len},"sha256":{},"seconds":{secs:.3}}}"#,
        js(&want)
    ))
}

/// Sends the hex file's bytes, half-closes, reads to the end; reports SHA-256 of both directions.
async fn tcp_send(o: &Opts) -> Result<String, String> {
    let t = target(o.req("target")?)?;
    let file = o.req("hex-file")?;
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    let data = hex::decode(text.trim()).map_err(|e| format!("{file}: {e}"))?;
    let client = connect(o, DatagramMode::Auto).await?;
    let mut tunnel = bounded(o.timeout, "CONNECT", client.connect_tcp(&t)).await?;
    let run = async {
        tunnel.write_all(&data).await?;
        tunnel.shutdown().await?;
        let mut back = Vec::new();
        tunnel.read_to_end(&mut back).await.map(|_| back)
    };
    let back = tokio::time::timeout(o.timeout, run)
        .await
        .map_err(|_| "no reply and FIN in time".to_string())?
        .map_err(|e| format!("tunnel: {e}"))?;
    client.close();
    Ok(format!(
        r#"{{"sent_len":{},"sent_sha256":{},"received_len":{},"received_sha256":{}}}"#,
        data.len(),
        js(&hex::encode(Sha256::digest(&data))),
        back.len(),
        js(&hex::encode(Sha256::digest(&back)))
    ))
}

async fn parallel(o: &Opts) -> Result<String, String> {
    let t = target(o.req("target")?)?;
    let n: usize = o.num("tunnels", 100)?;
    let per: usize = o.num("bytes", 4096)?;
    let client = std::sync::Arc::new(connect(o, DatagramMode::Auto).await?);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        let t = t.clone();
        let limit = o.timeout * 3;
        tasks.spawn(async move {
            let data = pattern_bytes(1000 + i as u64, 0, per);
            let run = async {
                let mut tunnel = client.connect_tcp(&t).await.map_err(|e| e.to_string())?;
                tunnel.write_all(&data).await.map_err(|e| e.to_string())?;
                tunnel.shutdown().await.map_err(|e| e.to_string())?;
                let mut back = Vec::new();
                tunnel
                    .read_to_end(&mut back)
                    .await
                    .map_err(|e| e.to_string())?;
                if back != data {
                    return Err(format!("echo differs ({} of {per} bytes)", back.len()));
                }
                Ok::<(), String>(())
            };
            match tokio::time::timeout(limit, run).await {
                Ok(r) => r.map_err(|e| format!("tunnel {i}: {e}")),
                Err(_) => Err(format!("tunnel {i}: timed out")),
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(format!("task: {e}")),
        }
    }
    client.close();
    if let Some(first) = failures.first() {
        return Err(format!(
            "{}/{n} tunnels failed; first: {first}",
            failures.len()
        ));
    }
    Ok(format!(
        r#"{{"tunnels":{n},"bytes_each":{per},"ms":{}}}"#,
        start.elapsed().as_millis()
    ))
}

async fn expect_status(o: &Opts) -> Result<String, String> {
    let want: u16 = o.num("status", 0)?;
    let client = connect(o, DatagramMode::Auto).await?;
    // h3 0.0.8 adds :scheme and :path to every request and cannot send a request without
    // :authority or with an arbitrary :protocol: those cases are for the other clients.
    let mut b = http::Request::builder().method(http::Method::CONNECT);
    let udp = o.get("path").is_some();
    b = match o.get("path") {
        Some(p) => b.uri(format!("https://{}{p}", o.relay)),
        None => b.uri(o.req("authority")?),
    };
    let mut req = b.body(()).map_err(|e| format!("request: {e}"))?;
    if udp {
        req.extensions_mut().insert(h3::ext::Protocol::CONNECT_UDP);
        req.headers_mut()
            .insert("capsule-protocol", http::HeaderValue::from_static("?1"));
    }
    let raw = bounded(o.timeout, "request", client.send_request(req)).await?;
    let status = raw.response.status().as_u16();
    let ps = raw
        .response
        .headers()
        .get("proxy-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if status != want {
        return Err(format!(
            "status {status}, expected {want} (proxy-status: {ps})"
        ));
    }
    if let Some(e) = o.get("proxy-status-error") {
        if !ps.split(';').any(|p| p.trim() == format!("error={e}")) {
            return Err(format!(
                "status {status} but Proxy-Status {ps:?} lacks error={e}"
            ));
        }
    }
    drop(raw);
    // The connection must survive a refused request (RFC 9114 §8).
    let probe = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("127.0.0.1:0")
        .body(())
        .map_err(|e| e.to_string())?;
    bounded(
        o.timeout,
        "second request on the same connection",
        client.send_request(probe),
    )
    .await?;
    client.close();
    Ok(format!(
        r#"{{"status":{status},"proxy_status":{}}}"#,
        js(&ps)
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let deadline = o.timeout * 12;
    let run = async {
        match o.cmd.as_str() {
            "udp-echo" => udp_echo(&o).await,
            "tcp-echo" => tcp_echo(&o).await,
            "parallel" => parallel(&o).await,
            "expect-status" => expect_status(&o).await,
            "tcp-send" => tcp_send(&o).await,
            other => Err(format!("unknown subcommand {other}")),
        }
    };
    let result = tokio::time::timeout(deadline, run)
        .await
        .unwrap_or_else(|_| Err(format!("deadline of {deadline:?} exceeded")));
    let ms = start.elapsed().as_millis();
    let (ok, detail) = match result {
        Ok(d) => (true, d),
        Err(e) => (false, js(&e)),
    };
    println!(
        r#"{{"client":"cfr","command":{},"ok":{ok},"detail":{detail},"elapsed_ms":{ms}}}"#,
        js(&o.cmd)
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
