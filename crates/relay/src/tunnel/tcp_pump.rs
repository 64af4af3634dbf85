//! The TCP pump: a CONNECT tunnel's byte stream, both ways, with half-close and resets.
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::core::Core;
use super::exchange::{TunnelRecv, TunnelSend};
use super::pump::{abort_client, grace_over, Activity, TunnelOutcome, TunnelStats};
use crate::metrics as m;

/// Moves a TCP byte stream both ways until both directions have ended: FIN from the client
/// becomes a TCP FIN (half-close) and vice versa; a TCP reset or error from the destination
/// resets the client stream (H3_CONNECT_ERROR, HTTP/2 CONNECT_ERROR, RFC 9113 §8.5); a client
/// reset aborts the TCP connection with RST.
//= https://www.rfc-editor.org/rfc/rfc9114#section-4.4
//# A proxy treats any error in the TCP connection, which
//# includes receiving a TCP segment with the RST bit set, as a stream
//# error of type H3_CONNECT_ERROR.
//
//= https://www.rfc-editor.org/rfc/rfc9114#section-4.4
//# If the proxy
//# detects that the client has reset the stream or aborted reading from
//# the stream, it MUST close the TCP connection.
//
//= https://www.rfc-editor.org/rfc/rfc9114#section-4.4
//# In all these cases, if the
//# underlying TCP implementation permits it, the proxy SHOULD send a TCP
//# segment with the RST bit set.
pub async fn relay_tcp<R: TunnelRecv, S: TunnelSend>(
    core: &Core,
    mut tcp: TcpStream,
    mut rx: R,
    mut tx: S,
) -> TunnelStats {
    let activity = Activity::new();
    let idle = Duration::from_secs(core.config.timeouts.tcp_idle_secs);
    let buf_size = core.config.limits.tcp_buffer_bytes;
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let (tcp_r, mut tcp_w) = tcp.split();

    let up = async {
        // A front-end hands over chunks as its transport delivered them: for HTTP/3 about one QUIC
        // packet each. One write syscall per packet costs more than the crypto, so chunks that are
        // already there are coalesced and written when the next one would have to be waited for.
        // The coalescing buffer is allocated at the first chunk, not at setup: a tunnel that never
        // sends (or closes at once) costs no `tcp_buffer_bytes` allocation.
        let mut pending = BytesMut::new();
        loop {
            let next = rx.recv();
            tokio::pin!(next);
            let received = match futures_util::FutureExt::now_or_never(next.as_mut()) {
                Some(r) => r,
                None => {
                    if !pending.is_empty() {
                        if tcp_w.write_all(&pending).await.is_err() {
                            return Err(TunnelOutcome::TargetReset);
                        }
                        pending.clear();
                    }
                    next.await
                }
            };
            match received {
                Ok(Some(chunk)) => {
                    activity.touch();
                    up_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if pending.len() + chunk.len() > buf_size && !pending.is_empty() {
                        if tcp_w.write_all(&pending).await.is_err() {
                            return Err(TunnelOutcome::TargetReset);
                        }
                        pending.clear();
                    }
                    let written = if chunk.len() >= buf_size {
                        tcp_w.write_all(&chunk).await
                    } else {
                        if pending.capacity() == 0 {
                            pending.reserve(buf_size);
                        }
                        pending.extend_from_slice(&chunk);
                        Ok(())
                    };
                    if written.is_err() {
                        return Err(TunnelOutcome::TargetReset);
                    }
                }
                Ok(None) => {
                    // Half-close: the destination sees FIN (after what is buffered), the other
                    // direction keeps going.
                    if !pending.is_empty() && tcp_w.write_all(&pending).await.is_err() {
                        return Err(TunnelOutcome::TargetReset);
                    }
                    let _ = tcp_w.shutdown().await;
                    return Ok(());
                }
                Err(_) => return Err(TunnelOutcome::ClientReset),
            }
        }
    };
    let down = async {
        // Read straight into the buffer that is sent on (no copy), allocated only once the
        // destination has sent something: an idle tunnel holds no buffer.
        let mut buf = BytesMut::new();
        loop {
            if tcp_r.as_ref().readable().await.is_err() {
                return Err(TunnelOutcome::TargetReset);
            }
            if buf.capacity() < buf_size / 4 {
                buf = BytesMut::with_capacity(buf_size);
            }
            match tcp_r.as_ref().try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = tx.finish().await;
                    return Ok(());
                }
                Ok(n) => {
                    activity.touch();
                    down_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if tx.send(buf.split().freeze()).await.is_err() {
                        return Err(TunnelOutcome::ClientReset);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(TunnelOutcome::TargetReset),
            }
        }
    };
    let idle_timer = async {
        activity.idle(idle).await;
        Err::<(), TunnelOutcome>(TunnelOutcome::IdleTimeout)
    };

    let result = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        r = idle_timer => r,
        o = grace_over(&core.grace_over) => Err(o),
    };
    let outcome = result.err().unwrap_or_default();
    if matches!(outcome, TunnelOutcome::ClientReset | TunnelOutcome::Drained) {
        // Client reset or drain: abort the TCP connection with RST (linger 0) rather than FIN.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    }
    abort_client(outcome, &mut rx, &mut tx);
    drop(tcp);
    let stats = TunnelStats {
        bytes_up: up_bytes.into_inner(),
        bytes_down: down_bytes.into_inner(),
        outcome,
        ..Default::default()
    };
    metrics::counter!(m::BYTES, "kind" => "tcp", "direction" => "up").increment(stats.bytes_up);
    metrics::counter!(m::BYTES, "kind" => "tcp", "direction" => "down").increment(stats.bytes_down);
    stats
}
