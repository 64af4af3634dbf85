//! CONNECT over TCP for the bench — HTTP/1.1 (plain or TLS) and HTTP/2 over TLS, against the
//! relay's TLS/TCP front-end and against the peer proxy — with cfr-client's front-end client
//! ([`cfr_client::front`]); these wrappers only fix the TLS name and the error type.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use cfr_client::front::{self, FrontRequest, FrontVersion, H2Connection, H2Stream};
use cfr_client::{ClientConfig, Trust};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The name the bench's dev certificates are issued for.
const SERVER_NAME: &str = "localhost";

/// TLS client settings trusting the bench's dev CA, offering `versions` by ALPN.
pub fn tls_config(
    ca_pem: &std::path::Path,
    versions: &[FrontVersion],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let cfg = ClientConfig::new(
        format!("https://{SERVER_NAME}"),
        Trust::CaFile(ca_pem.to_owned()),
    );
    front::tls_config(&cfg, versions).map_err(|e| e.to_string())
}

pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    front::tls_connect(addr, SERVER_NAME, cfg)
        .await
        .map_err(io::Error::other)
}

/// `CONNECT target HTTP/1.1`; on a 2xx the stream is the tunnel.
pub async fn h1_connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: SocketAddr,
    token: Option<&str>,
) -> io::Result<()> {
    let req = FrontRequest::Connect(target.to_string());
    let head = front::h1_request(s, &req, &target.to_string(), token).await?;
    if !req.opened(FrontVersion::Http11, head.status) {
        return Err(io::Error::other(format!(
            "CONNECT refused: {}",
            head.status
        )));
    }
    Ok(())
}

/// An HTTP/2 connection over `tls` and one CONNECT on it; the connection closes with the stream.
pub async fn h2_connect(
    tls: TlsStream<TcpStream>,
    target: SocketAddr,
    token: Option<&str>,
) -> io::Result<H2Stream> {
    let conn = H2Connection::handshake(tls, SERVER_NAME).await?;
    let (head, stream) = conn
        .request(&FrontRequest::Connect(target.to_string()), token)
        .await?;
    stream.ok_or_else(|| io::Error::other(format!("CONNECT refused: {}", head.status)))
}
