//! The UDP pump: a CONNECT-UDP tunnel's payloads between capsules / QUIC datagrams and the
//! connected egress socket.
//!
//! Per-datagram costs are kept out of the path: client QUIC datagrams go from the connection's
//! datagram reader straight to the socket ([`UdpUplink::send_datagrams`], no task or channel hop),
//! runs of equal size as one UDP GSO sendmsg; the socket is read with recvmmsg and UDP GRO
//! (quinn-udp), and the frames towards the client are cut from one shared buffer instead of one
//! allocation each.
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cfr_proto::capsule::{self, Capsule, CapsuleDecoder};
use cfr_proto::datagram::{self, MAX_UDP_PAYLOAD, UDP_PAYLOAD_CONTEXT};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::core::Core;
use super::exchange::{DatagramSent, TunnelRecv, TunnelSend, UdpChannels};
use super::pump::{abort_client, grace_over, Activity, TunnelOutcome, TunnelStats};
use crate::metrics as m;

/// The destination side of a CONNECT-UDP tunnel: its connected egress socket, shared by the pump
/// (which reads it) and by whatever hands it client datagrams (the pump for capsules, the HTTP/3
/// front-end's datagram reader for QUIC DATAGRAM frames).
pub struct UdpUplink {
    sock: UdpSocket,
    recv_state: quinn_udp::UdpSocketState,
    activity: Activity,
    datagrams: AtomicU64,
    bytes: AtomicU64,
    /// Cleared on the first GSO failure: one send per datagram from then on.
    gso: AtomicBool,
}

impl UdpUplink {
    /// Wraps the tunnel's connected socket; enables UDP GRO on it where the kernel has it.
    pub fn new(sock: UdpSocket) -> io::Result<UdpUplink> {
        let recv_state = quinn_udp::UdpSocketState::new((&sock).into())?;
        // A burst from the destination (an echo of a window of client datagrams) arrives while the
        // pump may be waiting for a CPU: the default receive buffer (rmem_default, ~90 datagrams
        // of 1200 bytes) drops the rest. A limit, not an allocation; the kernel caps it at
        // net.core.rmem_max.
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(UDP_RECV_BUFFER);
        Ok(UdpUplink {
            sock,
            recv_state,
            activity: Activity::new(),
            datagrams: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            gso: AtomicBool::new(true),
        })
    }

    /// Sends one UDP payload to the destination; never blocks.
    fn send_one(&self, core: &Core, data: &[u8]) {
        match self.sock.try_send(data) {
            Ok(_) => self.count(1, data.len()),
            //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
            //# UDP proxies MUST NOT introduce fragmentation at the IP layer when forwarding
            //# HTTP Datagrams onto a UDP socket; overly large datagrams are silently dropped.
            //
            // The egress socket sets DF / IP_PMTUDISC_PROBE (`cfr_egress::bind_udp`): a payload
            // the path cannot carry fails with EMSGSIZE and is dropped here, as is one the socket
            // buffer has no room for right now.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                core.datagram_dropped("udp_send_buffer_full")
            }
            Err(_) => core.datagram_dropped("udp_send_error"),
        }
    }

    fn count(&self, datagrams: usize, bytes: usize) {
        self.datagrams
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Sends a burst of HTTP datagram payloads (context ID + data) from the client's QUIC DATAGRAM
    /// frames. `payloads` is used as scratch space and left empty. Runs of equal size go out as
    /// one UDP_SEGMENT (GSO) sendmsg, which crosses the IP stack once instead of per datagram;
    /// everything else (and anything after a GSO failure) one send per datagram.
    pub fn send_datagrams(&self, core: &Core, payloads: &mut Vec<Bytes>) {
        self.activity.touch();
        // RFC 9298 §5 (quoted in the capsule path of `relay_udp`): only context ID 0 carries UDP
        // payloads; others are dropped, not errors.
        payloads.retain_mut(|p| match datagram::split_context_id(p) {
            Ok((UDP_PAYLOAD_CONTEXT, data)) => {
                *p = data;
                true
            }
            Ok(_) => {
                core.datagram_dropped("unknown_context_id");
                false
            }
            Err(_) => {
                core.datagram_dropped("malformed_datagram");
                false
            }
        });
        let mut rest = &payloads[..];
        while let Some(first) = rest.first() {
            let size = first.len();
            let run = rest
                .iter()
                .take_while(|d| d.len() == size)
                .take(GSO_MAX_SEGMENTS)
                .take((GSO_MAX_BYTES / size.max(1)).max(1))
                .count();
            let (group, tail) = rest.split_at(run);
            rest = tail;
            if run > 1 && size > 0 && self.gso.load(Ordering::Relaxed) {
                match send_segments(&self.sock, group, size) {
                    Ok(()) => {
                        self.count(run, run * size);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        for _ in 0..run {
                            core.datagram_dropped("udp_send_buffer_full");
                        }
                        continue;
                    }
                    // No GSO on this path (EIO, EINVAL) or a payload the path cannot carry
                    // (EMSGSIZE): one send per datagram from now on, with its own outcome.
                    Err(_) => self.gso.store(false, Ordering::Relaxed),
                }
            }
            for d in group {
                self.send_one(core, d);
            }
        }
        payloads.clear();
    }
}

/// Receive buffer of a tunnel's egress socket.
const UDP_RECV_BUFFER: usize = 1 << 20;

/// Datagrams read from the destination socket per recvmmsg.
const RECV_BATCH: usize = 16;
/// Room per received message: the largest UDP payload, or a GRO train of smaller ones.
const RECV_SLOT: usize = 1 << 16;
/// Frames towards the client are cut from buffers of this size (one allocation per burst).
const FRAME_ARENA: usize = 64 * 1024;

/// Moves UDP payloads between the client (QUIC datagrams and/or DATAGRAM capsules) and the
/// connected UDP socket until the request stream ends or the tunnel idles out.
///
//= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
//# The lifetime of the socket is tied to the request stream. The UDP proxy MUST
//# keep the socket open while the request stream is open.
//
//= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
//# UDP
//# proxies MAY choose to close sockets due to a period of inactivity, but they MUST
//# close the request stream when closing the socket.
pub async fn relay_udp<R: TunnelRecv, S: TunnelSend>(
    core: &Core,
    uplink: &UdpUplink,
    mut rx: R,
    mut tx: S,
    channels: UdpChannels,
) -> TunnelStats {
    let idle = Duration::from_secs(core.config.timeouts.udp_idle_secs);
    let down = AtomicU64::new(0);
    let bytes_down = AtomicU64::new(0);
    // Set once the client sends a capsule: from then on answer with capsules too, whatever was
    // negotiated (RFC 9297 §3.5 lets either encoding be used; curl only understands capsules).
    let client_uses_capsules = AtomicBool::new(channels.datagrams_out.is_none());
    let (cap_tx, mut cap_rx) = mpsc::channel::<Bytes>(core.config.limits.datagram_queue);
    let mut datagrams_out = channels.datagrams_out;

    // Client → destination, capsules on the request stream.
    let from_stream = async {
        let mut decoder = CapsuleDecoder::new(MAX_UDP_PAYLOAD + 8);
        loop {
            match rx.recv().await {
                Ok(Some(chunk)) => {
                    decoder.push(&chunk);
                    loop {
                        match decoder.next_capsule() {
                            Ok(Some(Capsule::Datagram { context_id, data })) => {
                                client_uses_capsules.store(true, Ordering::Relaxed);
                                if context_id == UDP_PAYLOAD_CONTEXT {
                                    uplink.activity.touch();
                                    uplink.send_one(core, &data);
                                } else {
                                    //= https://www.rfc-editor.org/rfc/rfc9298#section-5
                                    //# If an HTTP/3 Datagram that carries an unknown Context ID is
                                    //# received, the receiver SHALL either drop that datagram silently
                                    //# or buffer it temporarily
                                    //
                                    // Dropped, for capsules as for QUIC DATAGRAM frames.
                                    core.datagram_dropped("unknown_context_id");
                                }
                            }
                            //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
                            //# Endpoints that receive a Capsule with an unknown Capsule Type MUST
                            //# silently drop that Capsule and skip over it to parse the next Capsule.
                            Ok(Some(Capsule::Unknown { .. })) => {}
                            Ok(None) => break,
                            Err(_) => return Err(TunnelOutcome::MalformedCapsule),
                        }
                    }
                }
                Ok(None) => {
                    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
                    //# If the receive side of a stream carrying Capsules is terminated cleanly (for
                    //# example, in HTTP/3 this is defined as receiving a QUIC STREAM frame with the FIN
                    //# bit set) and the last Capsule on the stream was truncated, this MUST be treated
                    //# as if it were a malformed or incomplete message.
                    return if decoder.finish().is_ok() {
                        Ok(())
                    } else {
                        Err(TunnelOutcome::MalformedCapsule)
                    };
                }
                Err(_) => return Err(TunnelOutcome::ClientReset),
            }
        }
    };

    // Destination → client: recvmmsg (+ GRO trains) into fixed slots, one pass over the batch.
    let from_socket = async {
        // calloc'd: pages are only touched (resident) as far as datagrams fill them.
        let mut slots = vec![0u8; RECV_BATCH * RECV_SLOT];
        let mut bufs: Vec<IoSliceMut<'_>> =
            slots.chunks_mut(RECV_SLOT).map(IoSliceMut::new).collect();
        let mut meta = [quinn_udp::RecvMeta::default(); RECV_BATCH];
        let mut capsules = BytesMut::new();
        loop {
            let received = recv_batch(uplink, &mut bufs, &mut meta).await;
            let n = match received {
                Ok(n) => n,
                //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
                //# If a UDP proxy is
                //# notified by its operating system that its socket is no longer usable, it MUST
                //# close the request stream.
                //
                // TODO: not met for ICMP errors. On a connected socket Linux reports an ICMP port
                // unreachable once, as ECONNREFUSED, and the socket stays usable (the peer may come
                // back); the relay counts it and keeps the tunnel.
                Err(_) => {
                    core.datagram_dropped("udp_recv_error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            uplink.activity.touch();
            let via_quic = !client_uses_capsules.load(Ordering::Relaxed);
            if let (true, Some(out)) = (via_quic, datagrams_out.as_mut()) {
                out.begin_batch();
            }
            for (buf, meta) in bufs.iter().zip(&meta).take(n) {
                // A GRO train holds datagrams of `stride` bytes (the last may be shorter).
                let stride = if meta.stride == 0 {
                    meta.len
                } else {
                    meta.stride
                };
                // An empty UDP payload is a datagram too (RFC 9298 §5); chunks() yields none.
                let empty = (meta.len == 0).then_some(&[][..]);
                for data in buf[..meta.len].chunks(stride.max(1)).chain(empty) {
                    down.fetch_add(1, Ordering::Relaxed);
                    bytes_down.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if via_quic {
                        if let Some(out) = datagrams_out.as_mut() {
                            match out.send(UDP_PAYLOAD_CONTEXT, data) {
                                DatagramSent::Sent => continue,
                                DatagramSent::Dropped => {
                                    core.datagram_dropped("quic_datagram_send");
                                    continue;
                                }
                                //= https://www.rfc-editor.org/rfc/rfc9298#section-6.1
                                //# If a UDP proxy is using QUIC DATAGRAM
                                //# frames and it receives a UDP payload from the target that will not fit inside a
                                //# QUIC DATAGRAM frame, the UDP proxy SHOULD NOT send the UDP payload in a DATAGRAM
                                //# capsule
                                //
                                // TODO: not met. Too large for a DATAGRAM frame, the payload goes
                                // out in a capsule rather than being lost (and no ICMP Packet Too
                                // Big is sent): kept until the interop peers that rely on it
                                // (large DNS answers) are checked.
                                DatagramSent::TooLarge => {}
                            }
                        }
                    }
                    let c = frame_in(&mut capsules, data.len() + 16, |a| {
                        capsule::encode_datagram(UDP_PAYLOAD_CONTEXT, data, a)
                    });
                    // Never block the socket on a slow client: drop when the capsule queue is full.
                    if cap_tx.try_send(c).is_err() {
                        core.datagram_dropped("capsule_queue_full");
                    }
                }
            }
        }
    };

    // Capsules → client stream.
    let to_stream = async {
        while let Some(c) = cap_rx.recv().await {
            if tx.send(c).await.is_err() {
                return Err(TunnelOutcome::ClientReset);
            }
        }
        Ok(())
    };

    let idle_timer = async {
        uplink.activity.idle(idle).await;
        Err::<(), TunnelOutcome>(TunnelOutcome::IdleTimeout)
    };

    let result: Result<(), TunnelOutcome> = tokio::select! {
        r = from_stream => r,
        _ = from_socket => Ok(()),
        r = to_stream => r,
        r = idle_timer => r,
        o = grace_over(&core.grace_over) => Err(o),
    };
    let outcome = result.err().unwrap_or_default();
    if outcome == TunnelOutcome::Closed {
        let _ = tx.finish().await;
    }
    abort_client(outcome, &mut rx, &mut tx);
    let stats = TunnelStats {
        datagrams_up: uplink.datagrams.load(Ordering::Relaxed),
        datagrams_down: down.into_inner(),
        bytes_up: uplink.bytes.load(Ordering::Relaxed),
        bytes_down: bytes_down.into_inner(),
        outcome,
    };
    metrics::counter!(m::DATAGRAMS, "direction" => "up").increment(stats.datagrams_up);
    metrics::counter!(m::DATAGRAMS, "direction" => "down").increment(stats.datagrams_down);
    metrics::counter!(m::BYTES, "kind" => "udp", "direction" => "up").increment(stats.bytes_up);
    metrics::counter!(m::BYTES, "kind" => "udp", "direction" => "down").increment(stats.bytes_down);
    stats
}

/// Reads one batch of datagrams (and GRO trains) from the destination socket, waiting until there
/// is at least one.
///
/// On Linux a batch that did not fill every slot emptied the socket's queue, so the socket's readiness is
/// cleared with it: the next call waits for the next readiness event instead of spending a
/// recvmmsg that can only answer EAGAIN. (Clearing is safe against a datagram that arrived in
/// between: tokio only clears the readiness event it saw before the call, and the edge-triggered
/// poller reports a later arrival as a new event.)
async fn recv_batch(
    uplink: &UdpUplink,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [quinn_udp::RecvMeta],
) -> io::Result<usize> {
    loop {
        uplink.sock.readable().await?;
        let mut got = 0;
        let received = uplink.sock.try_io(tokio::io::Interest::READABLE, || {
            got = uplink.recv_state.recv((&uplink.sock).into(), bufs, meta)?;
            // Only recvmmsg (Linux) returns a short batch because the queue ran dry; elsewhere
            // quinn-udp reads one message per call whatever is queued.
            let full = bufs.len().min(meta.len()).min(quinn_udp::BATCH_SIZE);
            if cfg!(any(target_os = "linux", target_os = "android")) && got < full {
                // Reported as WouldBlock so that try_io clears the readiness; `got` has the batch.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(got)
        });
        match received {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => return Ok(got),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Cuts frames for the client out of shared buffers: a burst of datagrams costs one allocation
/// per [`FRAME_ARENA`] bytes, not one each.
pub fn frame_in(arena: &mut BytesMut, len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    if arena.capacity() < len {
        arena.reserve(len.max(FRAME_ARENA));
    }
    write(arena);
    arena.split().freeze()
}

/// At most this many client datagrams go out in one UDP_SEGMENT sendmsg (the kernel's limit is 64
/// on older Linux, 128 since 5.x).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// And at most this many bytes (one UDP datagram's worth of payload before segmentation).
const GSO_MAX_BYTES: usize = 60_000;

/// Sends `group` (all `size` bytes long, `size > 0`) to the connected socket's peer as separate
/// UDP datagrams with one sendmsg: UDP_SEGMENT (Linux GSO) cuts the concatenated payload every
/// `size` bytes. Each datagram keeps its own boundaries, DF and Not-ECT as with `send`.
fn send_segments(sock: &UdpSocket, group: &[Bytes], size: usize) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let segment = u16::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut iov = [IoSlice::new(&[]); GSO_MAX_SEGMENTS];
    let count = group.len().min(GSO_MAX_SEGMENTS);
    for (slot, d) in iov.iter_mut().zip(group) {
        *slot = IoSlice::new(d);
    }
    sock.try_io(tokio::io::Interest::WRITABLE, || {
        sendmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &iov[..count],
            &[ControlMessage::UdpGsoSegments(&segment)],
            MsgFlags::empty(),
            None,
        )
        .map(|_| ())
        .map_err(io::Error::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gso_batch_arrives_as_separate_datagrams() {
        let dest = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(dest.local_addr().unwrap()).await.unwrap();
        sock.writable().await.unwrap();
        let group: Vec<Bytes> = (0u8..5).map(|i| Bytes::from(vec![i; 1200])).collect();
        match send_segments(&sock, &group, 1200) {
            Ok(()) => {}
            // No UDP GSO here: the relay falls back to one send per datagram.
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => return,
            Err(e) => panic!("GSO send failed: {e}"),
        }
        let mut buf = [0u8; 4096];
        for i in 0u8..5 {
            let n = dest.recv(&mut buf).unwrap();
            assert_eq!(n, 1200, "datagram {i} must keep its own boundary");
            assert!(
                buf[..n].iter().all(|&b| b == i),
                "datagram {i} out of order or mixed"
            );
        }
    }
}
