//! TCP bulk: the same byte count through each path, one stream and eight in parallel.
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::env::{self, bulk_client, Dir, Env};
use crate::front;
use crate::report::Row;
use crate::Plan;
use cfr_client::FrontVersion;

pub const SECTION: &str = "tcp bulk";

/// Names of the rows, so ratios and targets can refer to them.
pub fn name(path: &str, streams: usize, dir: Dir) -> String {
    let unit = match path {
        "direct TCP" => "conn",
        "raw quinn" => "stream",
        _ => "tunnel",
    };
    let plural = if streams == 1 { "" } else { "s" };
    format!("{path}, {streams} {unit}{plural}, {}", dir.as_str())
}

/// Bounds one transfer: generous for a slow box, never unbounded.
pub fn transfer_timeout(bytes: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs(bytes / (20 << 20))
}

/// Opens `n` streams with `open`, then times the bulk transfer of `total / n` bytes on each, all
/// at once. Returns Gbit/s of payload.
pub async fn timed_bulk<S, F, Fut>(n: usize, total: u64, dir: Dir, open: F) -> Result<f64, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    F: Fn() -> Fut,
    Fut: Future<Output = io::Result<S>>,
{
    let per = total / n as u64;
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let s = tokio::time::timeout(Duration::from_secs(20), open())
            .await
            .map_err(|_| "opening the stream timed out".to_string())?
            .map_err(|e| format!("opening the stream: {e}"))?;
        streams.push(s);
    }
    let started = Instant::now();
    let work =
        futures_util::future::try_join_all(streams.iter_mut().map(|s| bulk_client(s, dir, per)));
    tokio::time::timeout(transfer_timeout(total), work)
        .await
        .map_err(|_| "transfer timed out".to_string())?
        .map_err(|e| format!("transfer: {e}"))?;
    let secs = started.elapsed().as_secs_f64();
    for s in &mut streams {
        let _ = tokio::time::timeout(Duration::from_secs(2), s.shutdown()).await;
    }
    Ok((per * n as u64) as f64 * 8.0 / secs / 1e9)
}

pub async fn run(env: &Env, plan: &Plan, rows: &mut Vec<Row>) {
    let origin = match env::bulk_origin(&env.tasks).await {
        Ok(a) => a,
        Err(e) => {
            rows.push(Row::unavailable(
                SECTION,
                "origin",
                "",
                format!("origin: {e}"),
            ));
            return;
        }
    };
    let quic = env::quic_server(env);
    let quic_conn = match &quic {
        Ok(addr) => env::quic_client(env, *addr).await,
        Err(e) => Err(e.clone()),
    };
    let client = env.client().await;
    let front_tls = front::tls_config(&env.pki.ca_cert, &[FrontVersion::Http11]);
    let front_tls_h2 = front::tls_config(&env.pki.ca_cert, &[FrontVersion::H2]);
    let bytes = plan.bytes;

    for dir in [Dir::Up, Dir::Down] {
        for n in [1usize, 8] {
            let r = timed_bulk(n, bytes, dir, || env::direct_tcp(origin)).await;
            rows.push(Row::from_result(
                SECTION,
                name("direct TCP", n, dir),
                "Gbit/s",
                r,
            ));

            let r = match &quic_conn {
                Ok((_, conn)) => {
                    timed_bulk(n, bytes, dir, || async {
                        let (w, r) = conn.open_bi().await.map_err(io::Error::other)?;
                        Ok(env::Duplex { r, w })
                    })
                    .await
                }
                Err(e) => Err(format!("raw quinn: {e}")),
            };
            rows.push(Row::from_result(
                SECTION,
                name("raw quinn", n, dir),
                "Gbit/s",
                r,
            ));

            let r = match &client {
                Ok(c) => {
                    timed_bulk(n, bytes, dir, || async {
                        c.connect_tcp(&env::target(origin))
                            .await
                            .map_err(io::Error::other)
                    })
                    .await
                }
                Err(e) => Err(e.clone()),
            };
            rows.push(Row::from_result(
                SECTION,
                name("h3 CONNECT", n, dir),
                "Gbit/s",
                r,
            ));
        }
        rows.push(front_row(env, &front_tls, origin, dir, false, bytes).await);
        rows.push(front_row(env, &front_tls_h2, origin, dir, true, bytes).await);
    }
    if let Ok(c) = client {
        c.close();
    }
    if let Ok((ep, conn)) = quic_conn {
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
    }
}

/// One tunnel through the relay's TLS/TCP front-end (HTTP/1.1 or HTTP/2 CONNECT).
async fn front_row(
    env: &Env,
    tls: &Result<std::sync::Arc<rustls::ClientConfig>, String>,
    origin: SocketAddr,
    dir: Dir,
    h2: bool,
    bytes: u64,
) -> Row {
    let path = if h2 {
        "TLS/TCP h2 CONNECT"
    } else {
        "TLS/TCP h1 CONNECT"
    };
    let name = name(path, 1, dir);
    let Some(front) = env.tcp_front else {
        return Row::unavailable(
            SECTION,
            name,
            "Gbit/s",
            "the relay has no TLS/TCP front-end",
        );
    };
    let tls = match tls {
        Ok(t) => t.clone(),
        Err(e) => return Row::unavailable(SECTION, name, "Gbit/s", e.clone()),
    };
    let r = if h2 {
        timed_bulk(1, bytes, dir, || {
            let tls = tls.clone();
            async move {
                let s = front::tls_connect(front, tls).await?;
                front::h2_connect(s, origin, Some(env::TOKEN)).await
            }
        })
        .await
    } else {
        timed_bulk(1, bytes, dir, || {
            let tls = tls.clone();
            async move {
                let mut s = front::tls_connect(front, tls).await?;
                front::h1_connect(&mut s, origin, Some(env::TOKEN)).await?;
                Ok(s)
            }
        })
        .await
    };
    Row::from_result(SECTION, name, "Gbit/s", r)
}
