//! Local SOCKS5 server (RFC 1928): CONNECT over classic CONNECT tunnels, UDP ASSOCIATE over
//! CONNECT-UDP tunnels. Domain names go to the relay unresolved (socks5h semantics).
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use cfr_proto::{DecodeError, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::{accept_loop, socks5_reply_for, splice, HANDSHAKE_TIMEOUT};
use crate::socks5::{self as codec, method, Address, Command, Reply, UdpHeader};
use crate::TunnelOpener;

/// Largest handshake message: a request with a 255-byte domain is 262 bytes; RFC 1929 is 513.
const MAX_HANDSHAKE: usize = 1024;
/// Distinct destinations per UDP association; datagrams to further destinations are dropped.
pub const MAX_UDP_DESTINATIONS: usize = 256;
/// Outgoing datagrams queued per destination while its tunnel opens or is busy; full → drop.
const UDP_OUT_QUEUE: usize = 256;

/// Serves SOCKS5 on `listener` forever. With `auth`, clients must authenticate with that
/// username and password (RFC 1929); without, only the "no authentication" method is offered.
pub async fn serve<O: TunnelOpener + Clone>(
    listener: TcpListener,
    opener: O,
    auth: Option<(String, String)>,
) -> std::io::Result<()> {
    let auth = Arc::new(auth);
    accept_loop(listener, move |stream, peer| {
        let opener = opener.clone();
        let auth = auth.clone();
        async move {
            if let Err(e) = handle(stream, peer, opener, &auth).await {
                tracing::debug!(%peer, error = %e, "SOCKS5 client ended");
            }
        }
    })
    .await
}

/// Reads until `parse` yields a value; returns it and keeps the unparsed rest in `buf`.
async fn read_msg<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<(T, usize), DecodeError>,
) -> std::io::Result<Result<T, &'static str>> {
    loop {
        match parse(buf) {
            Ok((v, n)) => {
                buf.drain(..n);
                return Ok(Ok(v));
            }
            Err(DecodeError::Malformed(why)) => return Ok(Err(why)),
            Err(DecodeError::Incomplete) => {}
        }
        if buf.len() >= MAX_HANDSHAKE {
            return Ok(Err("SOCKS5 handshake message too long"));
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn invalid(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string())
}

async fn handle<O: TunnelOpener + Clone>(
    mut stream: TcpStream,
    peer: SocketAddr,
    opener: O,
    auth: &Option<(String, String)>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(MAX_HANDSHAKE);
    let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        // RFC 1928 §3: method selection.
        let greeting = match read_msg(&mut stream, &mut buf, codec::parse_greeting).await? {
            Ok(g) => g,
            // Not SOCKS5 at all: no reply format applies; just close.
            Err(why) => return Err(invalid(why)),
        };
        let wanted = if auth.is_some() {
            method::USER_PASS
        } else {
            method::NO_AUTH
        };
        if !greeting.offers(wanted) {
            stream
                .write_all(&codec::encode_method_selection(method::NO_ACCEPTABLE))
                .await?;
            return Err(invalid("no acceptable authentication method"));
        }
        stream
            .write_all(&codec::encode_method_selection(wanted))
            .await?;
        if let Some((user, pass)) = auth {
            // RFC 1929 §2: a failure status "MUST" close the connection.
            let ok = match read_msg(&mut stream, &mut buf, codec::parse_user_pass).await? {
                Ok(up) => up.username == user.as_bytes() && up.password == pass.as_bytes(),
                Err(_) => false,
            };
            stream
                .write_all(&codec::encode_user_pass_status(ok))
                .await?;
            if !ok {
                return Err(invalid("SOCKS5 authentication failed"));
            }
        }
        match read_msg(&mut stream, &mut buf, codec::parse_request).await? {
            Ok(req) => Ok(req),
            Err(why) => {
                let reply = if why == codec::ERR_ADDRESS_TYPE {
                    Reply::AddressTypeNotSupported
                } else {
                    Reply::GeneralFailure
                };
                stream.write_all(&codec::reply_bytes(reply)).await?;
                Err(invalid(why))
            }
        }
    })
    .await;
    let request = match negotiated {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };

    match request.command {
        Command::Connect => {
            let Some(target) = request.address.to_target() else {
                stream
                    .write_all(&codec::reply_bytes(Reply::HostUnreachable))
                    .await?;
                return Err(invalid("unusable destination"));
            };
            let tunnel = match opener.connect_tcp(&target).await {
                Ok(t) => t,
                Err(e) => {
                    stream
                        .write_all(&codec::reply_bytes(socks5_reply_for(&e)))
                        .await?;
                    return Err(std::io::Error::other(e.to_string()));
                }
            };
            // BND.ADDR: the relay's egress address is deliberately not disclosed.
            stream
                .write_all(&codec::reply_bytes(Reply::Succeeded))
                .await?;
            let mut tunnel = tunnel;
            if !buf.is_empty() {
                // Bytes the client pipelined after its request belong to the tunnel.
                tokio::io::AsyncWriteExt::write_all(&mut tunnel, &buf).await?;
            }
            splice(stream, tunnel).await;
            Ok(())
        }
        Command::UdpAssociate => udp_associate(stream, peer, request.address, opener).await,
        Command::Bind | Command::Other(_) => {
            stream
                .write_all(&codec::reply_bytes(Reply::CommandNotSupported))
                .await?;
            Err(invalid("command not supported"))
        }
    }
}

/// RFC 1928 §7: relays UDP between the client and one CONNECT-UDP tunnel per destination until
/// the TCP control connection closes.
async fn udp_associate<O: TunnelOpener + Clone>(
    mut control: TcpStream,
    peer: SocketAddr,
    requested: Address,
    opener: O,
) -> std::io::Result<()> {
    let local_ip = control.local_addr()?.ip();
    let socket = match UdpSocket::bind(SocketAddr::new(local_ip, 0)).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            control
                .write_all(&codec::reply_bytes(Reply::GeneralFailure))
                .await?;
            return Err(e);
        }
    };
    let mut reply = Vec::new();
    codec::encode_reply(
        Reply::Succeeded,
        &Address::from(socket.local_addr()?),
        &mut reply,
    );
    control.write_all(&reply).await?;

    // RFC 1928 §7: datagrams from any source other than the client's are dropped. The client
    // may name its source port in the request; otherwise the first datagram from its IP fixes it.
    let mut client: Option<SocketAddr> = match requested {
        Address::V4(ip, port) if port != 0 && !ip.is_unspecified() => {
            Some(SocketAddr::new(IpAddr::V4(ip), port))
        }
        Address::V6(ip, port) if port != 0 && !ip.is_unspecified() => {
            Some(SocketAddr::new(IpAddr::V6(ip), port))
        }
        _ => None,
    };
    let mut flows: HashMap<Target, mpsc::Sender<Bytes>> = HashMap::new();
    let (back_tx, mut back_rx) = mpsc::channel::<Bytes>(UDP_OUT_QUEUE);
    let mut pkt = vec![0u8; 65_535];
    let mut ctl = [0u8; 64];
    loop {
        tokio::select! {
            r = control.read(&mut ctl) => match r {
                // The association ends when the control connection closes (RFC 1928 §6/§7).
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {} // Anything else on the control connection is ignored.
            },
            Some(back) = back_rx.recv() => {
                if let Some(c) = client {
                    let _ = socket.send_to(&back, c).await;
                }
            }
            r = socket.recv_from(&mut pkt) => {
                // A transient error (e.g. an ICMP error surfacing on the socket) must not end
                // the association; the control connection decides its life.
                let Ok((n, from)) = r else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                if from.ip() != peer.ip() || client.is_some_and(|c| c != from) {
                    continue;
                }
                client = Some(from);
                let Ok((hdr, used)) = codec::parse_udp_header(&pkt[..n]) else { continue };
                // RFC 1928 §7: fragmentation is optional; we drop fragments.
                if hdr.frag != 0 {
                    continue;
                }
                let Some(target) = hdr.address.to_target() else { continue };
                let payload = Bytes::copy_from_slice(&pkt[used..n]);
                if let Some(tx) = flows.get(&target) {
                    match tx.try_send(payload) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                        // The flow ended (tunnel refused or closed): reopen below.
                        Err(mpsc::error::TrySendError::Closed(p)) => {
                            flows.remove(&target);
                            if flows.len() >= MAX_UDP_DESTINATIONS { continue; }
                            let tx = spawn_flow(opener.clone(), target.clone(), hdr.address, back_tx.clone());
                            let _ = tx.try_send(p);
                            flows.insert(target, tx);
                        }
                    }
                } else if flows.len() < MAX_UDP_DESTINATIONS {
                    let tx = spawn_flow(opener.clone(), target.clone(), hdr.address, back_tx.clone());
                    let _ = tx.try_send(payload);
                    flows.insert(target, tx);
                }
            }
        }
    }
}

/// One destination of a UDP association: opens its tunnel, then moves datagrams both ways.
fn spawn_flow<O: TunnelOpener + Clone>(
    opener: O,
    target: Target,
    address: Address,
    back: mpsc::Sender<Bytes>,
) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(UDP_OUT_QUEUE);
    tokio::spawn(async move {
        let tunnel = match opener.connect_udp(&target).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "UDP tunnel refused");
                // Swallow this destination's datagrams for a while instead of asking the relay
                // again for every datagram.
                let _ = tokio::time::timeout(REFUSED_HOLD_DOWN, async {
                    while rx.recv().await.is_some() {}
                })
                .await;
                return;
            }
        };
        // Replies carry the destination as the client named it (RFC 1928 §7 header).
        let mut header = Vec::with_capacity(address.encoded_len() + 3);
        UdpHeader { frag: 0, address }.encode(&mut header);
        loop {
            tokio::select! {
                out = rx.recv() => match out {
                    Some(p) => {
                        if tunnel.send(&p).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                r = tunnel.recv() => match r {
                    Ok(data) => {
                        let mut pkt = Vec::with_capacity(header.len() + data.len());
                        pkt.extend_from_slice(&header);
                        pkt.extend_from_slice(&data);
                        // Full → drop (UDP semantics).
                        let _ = back.try_send(Bytes::from(pkt));
                    }
                    Err(_) => return,
                },
            }
        }
    });
    tx
}

/// How long datagrams to a destination whose tunnel was refused are dropped before retrying.
const REFUSED_HOLD_DOWN: std::time::Duration = std::time::Duration::from_secs(5);
