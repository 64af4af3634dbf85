//! Clients for CONNECT over TCP: HTTP/1.1 (plain or TLS) and HTTP/2 over TLS, used against the
//! relay's TLS/TCP front-end and against the peer proxy.
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// TLS client config trusting the bench's dev CA (TLS 1.3 and 1.2, ring).
pub fn tls_config(
    ca_pem: &std::path::Path,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(ca_pem).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(cfr_relay::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("static name");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// Sends `CONNECT target HTTP/1.1` and reads the response head; the stream is then the tunnel.
pub async fn h1_connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: SocketAddr,
    token: Option<&str>,
) -> io::Result<()> {
    let auth = token
        .map(|t| format!("Proxy-Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    // The origin speaks only after our first bytes, so nothing follows the head: read it bytewise.
    let mut head = Vec::with_capacity(128);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "proxy closed before its response",
            ));
        }
        head.push(b[0]);
        if head.len() > 8192 {
            return Err(io::Error::other("response head too long"));
        }
    }
    let status_line = head.split(|&c| c == b'\r').next().unwrap_or_default();
    let status = String::from_utf8_lossy(status_line);
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::other(format!("CONNECT refused: {status}")));
    }
    Ok(())
}

/// An HTTP/2 CONNECT stream as a byte stream.
pub struct H2Tunnel {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    leftover: Bytes,
    eof: bool,
}

/// Opens an HTTP/2 connection over `tls` with large windows (a tunnel should not be limited by
/// HTTP/2 flow control on loopback) and sends one CONNECT.
pub async fn h2_connect(
    tls: TlsStream<TcpStream>,
    target: SocketAddr,
    token: Option<&str>,
) -> io::Result<(H2Tunnel, tokio::task::JoinHandle<()>)> {
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_send_buffer_size(1 << 20)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(io::Error::other)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder().method(http::Method::CONNECT).uri(
        http::Uri::builder()
            .authority(target.to_string())
            .build()
            .map_err(io::Error::other)?,
    );
    if let Some(t) = token {
        req = req.header(http::header::PROXY_AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(()).map_err(io::Error::other)?;
    client = client.ready().await.map_err(io::Error::other)?;
    let (resp, send) = client.send_request(req, false).map_err(io::Error::other)?;
    let resp = resp.await.map_err(io::Error::other)?;
    if !resp.status().is_success() {
        driver.abort();
        return Err(io::Error::other(format!(
            "CONNECT refused: {}",
            resp.status()
        )));
    }
    Ok((
        H2Tunnel {
            send,
            recv: resp.into_body(),
            leftover: Bytes::new(),
            eof: false,
        },
        driver,
    ))
}

impl AsyncRead for H2Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.leftover.is_empty() {
                let n = this.leftover.len().min(buf.remaining());
                buf.put_slice(&this.leftover.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    let _ = this.recv.flow_control().release_capacity(b.len());
                    this.leftover = b;
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => this.eof = true,
            }
        }
    }
}

impl AsyncWrite for H2Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len().min(256 * 1024));
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(io::Error::other)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let _ = this.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}
