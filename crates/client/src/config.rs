//! Client configuration: relay URL, trust anchors, QUIC transport parameters.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::ClientError;

/// How the client decides whether a relay's certificate is genuine.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The operating system's trust store (rustls-native-certs).
    System,
    /// PEM file with one or more CA certificates.
    CaFile(PathBuf),
    /// PEM bytes with one or more CA certificates.
    CaPem(Vec<u8>),
    /// Exact end-entity certificate (DER) the relay must present; name and validity period are
    /// not checked (the pin is the identity), the handshake signature still is.
    PinnedCertDer(Vec<u8>),
}

impl Trust {
    /// [`Trust::PinnedCertDer`] from a file holding the relay's certificate, PEM (the first
    /// certificate in the file: the end-entity one of a chain) or DER.
    pub fn pinned_from_file(path: &std::path::Path) -> Result<Trust, ClientError> {
        let bytes = std::fs::read(path)
            .map_err(|e| ClientError::Tls(format!("reading {}: {e}", path.display())))?;
        if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            let mut reader = bytes.as_slice();
            let cert = rustls_pemfile::certs(&mut reader)
                .next()
                .ok_or_else(|| {
                    ClientError::Tls(format!(
                        "{}: no CERTIFICATE in the PEM file",
                        path.display()
                    ))
                })?
                .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
            return Ok(Trust::PinnedCertDer(cert.to_vec()));
        }
        // DER: an X.509 certificate is an ASN.1 SEQUENCE (tag 0x30).
        if bytes.first() != Some(&0x30) {
            return Err(ClientError::Tls(format!(
                "{}: neither a PEM nor a DER certificate",
                path.display()
            )));
        }
        Ok(Trust::PinnedCertDer(bytes))
    }
}

/// How UDP payloads travel to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatagramMode {
    /// QUIC DATAGRAM frames when the relay negotiated HTTP/3 datagrams, DATAGRAM capsules otherwise.
    #[default]
    Auto,
    /// Always DATAGRAM capsules on the request stream (what curl does).
    Capsules,
}

/// Which transports [`crate::select::RelaySet`] uses to reach a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportMode {
    /// HTTP/3; when its handshake fails or times out (UDP blocked), the relay's TLS/TCP
    /// front-end on the same host and port (HTTP/2, else HTTP/1.1), retrying HTTP/3 in the
    /// background.
    #[default]
    Auto,
    /// HTTP/3 only.
    H3,
    /// The TLS/TCP front-end only (HTTP/2, else HTTP/1.1).
    TlsTcp,
}

impl std::str::FromStr for TransportMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TransportMode::Auto),
            "h3" => Ok(TransportMode::H3),
            "tcp" => Ok(TransportMode::TlsTcp),
            other => Err(format!("unknown transport {other:?} (auto, h3, tcp)")),
        }
    }
}

impl std::fmt::Display for TransportMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportMode::Auto => "auto",
            TransportMode::H3 => "h3",
            TransportMode::TlsTcp => "tcp",
        })
    }
}

/// Everything [`crate::RelayClient::connect`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://host:port` (port defaults to 443); the host is also the TLS SNI.
    pub relay: String,
    pub trust: Trust,
    /// Sent as `proxy-authorization: Bearer <token>` on every CONNECT.
    pub token: Option<String>,
    /// QUIC + HTTP/3 handshake timeout (until the relay's SETTINGS arrived); also bounds the
    /// TCP + TLS (+ HTTP/2) handshake of the TLS/TCP front-end.
    pub connect_timeout: Duration,
    pub datagrams: DatagramMode,
    /// Local UDP bind address; default: unspecified address of the relay's family, any port.
    pub local_bind: Option<SocketAddr>,
    /// Client certificate for mTLS: (PEM certificate chain, PEM private key) — e.g. from
    /// `cfr cert --client NAME`. Presented when the relay asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The relay's connect-udp URI template (e.g. learnt from its PvD); `None`: the RFC 9298
    /// default `/.well-known/masque/udp/{target_host}/{target_port}/`.
    pub udp_template: Option<cfr_proto::UdpTemplate>,
    /// Which transports a [`crate::select::RelaySet`] may use (a [`crate::RelayClient`] is
    /// always HTTP/3, a [`crate::FrontClient`] always TLS/TCP).
    pub transport: TransportMode,
}

impl ClientConfig {
    /// A config with defaults for everything but the relay URL and trust.
    pub fn new(relay: impl Into<String>, trust: Trust) -> Self {
        ClientConfig {
            relay: relay.into(),
            trust,
            token: None,
            connect_timeout: Duration::from_secs(10),
            datagrams: DatagramMode::Auto,
            local_bind: None,
            client_cert: None,
            udp_template: None,
            transport: TransportMode::Auto,
        }
    }

    /// The connect-udp request path for `target`: the relay's URI template expanded, or the
    /// RFC 9298 default template.
    pub fn connect_udp_path(&self, target: &cfr_proto::Target) -> String {
        match &self.udp_template {
            // RFC 9298 §3: "the client SHALL perform URI Template expansion to determine the
            // path and query of its request".
            Some(template) => template.expand(target),
            None => cfr_proto::target::connect_udp_path(target),
        }
    }

    /// Checks everything that can be checked without the network: the relay URL, the trust
    /// anchors and client certificate (files readable, certificates parseable) and the token's
    /// header syntax.
    pub fn validate(&self) -> Result<(), ClientError> {
        let url = RelayUrl::parse(&self.relay)?;
        url.server_name()?;
        rustls_config_with_cert(&self.trust, self.client_cert.as_ref())?;
        if let Some(token) = &self.token {
            if token.is_empty() {
                return Err(ClientError::InvalidUrl("empty token".into()));
            }
            http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::InvalidUrl("token contains characters not allowed in a header".into())
            })?;
        }
        Ok(())
    }
}

/// A parsed relay URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    /// Host without brackets (DNS name or IP literal); used for SNI and resolution.
    pub host: String,
    pub port: u16,
    /// `host:port` as it goes into `:authority` (IPv6 in brackets).
    pub authority: String,
}

impl RelayUrl {
    /// Parses `https://host[:port][/]`. Only the `https` scheme is accepted: HTTP/3 is always TLS.
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::InvalidUrl(format!("{url:?}: {why}"));
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URI"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("scheme must be https"));
        }
        let auth = uri.authority().ok_or_else(|| bad("missing host"))?;
        if auth.as_str().contains('@') {
            return Err(bad("userinfo is not allowed"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("path and query are not allowed"));
        }
        let host = auth.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        if host.contains('%') {
            return Err(bad("IPv6 zone identifiers are not allowed"));
        }
        // http::Uri leaves an out-of-range port unparsed rather than rejecting it.
        let port_text = auth
            .as_str()
            .rsplit_once(']')
            .map_or(auth.as_str(), |(_, p)| p);
        let port = match port_text.rsplit_once(':') {
            Some((_, p)) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
            None => 443,
        };
        if port == 0 {
            return Err(bad("port 0"));
        }
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(RelayUrl {
            host: host.to_ascii_lowercase(),
            port,
            authority,
        })
    }

    pub(crate) fn server_name(&self) -> Result<ServerName<'static>, ClientError> {
        ServerName::try_from(self.host.clone()).map_err(|_| {
            ClientError::InvalidUrl(format!("{:?} is not a valid TLS name", self.host))
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut reader = pem;
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("reading CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("bad CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls("no CA certificate in PEM".into()));
    }
    Ok(roots)
}

/// Builds the rustls client config (TLS 1.3 only — QUIC requires it, RFC 9001 §4.2), without a
/// client certificate.
#[cfg(test)]
pub(crate) fn rustls_config(trust: &Trust) -> Result<rustls::ClientConfig, ClientError> {
    rustls_config_with_cert(trust, None)
}

/// A client certificate chain and its private key.
type ClientCertKey = (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// Reads a client certificate chain and its key (PEM files).
fn load_client_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<ClientCertKey, ClientError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ClientError::Tls(format!("reading {}: {e}", p.display())))
    };
    let chain = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Tls(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(ClientError::Tls(format!(
            "{}: no PEM certificate found",
            cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut &read(key)?[..])
        .map_err(|e| ClientError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| ClientError::Tls(format!("{}: no PEM private key found", key.display())))?;
    Ok((chain, key))
}

/// [`rustls_config`] plus an optional client certificate (cert PEM, key PEM) for mTLS.
pub(crate) fn rustls_config_with_cert(
    trust: &Trust,
    client_cert: Option<&(PathBuf, PathBuf)>,
) -> Result<rustls::ClientConfig, ClientError> {
    let client_auth = client_cert
        .map(|(c, k)| load_client_cert(c, k))
        .transpose()?;
    let finish =
        move |b: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>| {
            match client_auth {
                Some((chain, key)) => b
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::Tls(format!("client certificate: {e}"))),
                None => Ok(b.with_no_client_auth()),
            }
        };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = match trust {
        Trust::System => {
            let loaded = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            for cert in loaded.certs {
                // Broken entries in a system store are common; skip them rather than fail.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(ClientError::Tls("no usable system CA certificates".into()));
            }
            finish(builder.with_root_certificates(roots))?
        }
        Trust::CaFile(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| ClientError::Tls(format!("reading {}: {e}", path.display())))?;
            finish(builder.with_root_certificates(roots_from_pem(&pem)?))?
        }
        Trust::CaPem(pem) => finish(builder.with_root_certificates(roots_from_pem(pem)?))?,
        Trust::PinnedCertDer(der) => finish(builder.dangerous().with_custom_certificate_verifier(
            Arc::new(PinnedCert {
                der: der.clone(),
                provider: provider(),
            }),
        ))?,
    };
    // RFC 9114 §3.1: the ALPN token for HTTP/3 is "h3".
    cfg.alpn_protocols = vec![b"h3".to_vec()];
    Ok(cfg)
}

/// QUIC transport parameters tuned for tunnelling.
pub(crate) fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Advertising a datagram receive buffer makes quinn send max_datagram_frame_size (RFC 9221 §3),
    // which RFC 9297 §2.1.1 requires alongside SETTINGS_H3_DATAGRAM.
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    t.initial_mtu(cfr_proto::datagram::TUNNEL_INITIAL_MTU);
    t.keep_alive_interval(Some(Duration::from_secs(15)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(60)).expect("60 s fits a QUIC varint"),
    ));
    t.receive_window(quinn::VarInt::from_u32(16 << 20));
    t.stream_receive_window(quinn::VarInt::from_u32(4 << 20));
    t.send_window(16 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1000));
    // The relay opens only its control and QPACK streams towards us.
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
    t
}

pub(crate) fn quinn_client_config(
    trust: &Trust,
    client_cert: Option<&(PathBuf, PathBuf)>,
) -> Result<quinn::ClientConfig, ClientError> {
    let tls = rustls_config_with_cert(trust, client_cert)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// Accepts exactly one end-entity certificate.
#[derive(Debug)]
struct PinnedCert {
    der: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.der.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The pin replaces the chain check, not proof of possession of the pinned key.
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_url_defaults_port_443() {
        let u = RelayUrl::parse("https://relay.example").unwrap();
        assert_eq!(u.host, "relay.example");
        assert_eq!(u.port, 443);
        assert_eq!(u.authority, "relay.example:443");
    }

    #[test]
    fn relay_url_accepts_ipv6_literal_with_port() {
        let u = RelayUrl::parse("https://[::1]:4433/").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, 4433);
        assert_eq!(u.authority, "[::1]:4433");
        assert!(u.server_name().is_ok());
    }

    #[test]
    fn relay_url_accepts_ipv4_literal() {
        let u = RelayUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8443));
    }

    #[test]
    fn relay_url_rejects_non_https_paths_userinfo_and_port_zero() {
        for bad in [
            "http://relay:443",
            "relay:443",
            "https://relay/path",
            "https://user@relay",
            "https://relay:0",
            "https://relay:99999",
            "https://",
        ] {
            assert!(
                matches!(RelayUrl::parse(bad), Err(ClientError::InvalidUrl(_))),
                "{bad} must be rejected"
            );
        }
    }

    #[test]
    fn pinned_cert_loads_from_pem_or_der_and_rejects_other_files() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("cfr-pin-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pem, der, junk) = (dir.join("c.pem"), dir.join("c.der"), dir.join("junk"));
        std::fs::write(&pem, cert.cert.pem()).unwrap();
        std::fs::write(&der, cert.cert.der()).unwrap();
        std::fs::write(&junk, "hello").unwrap();
        for path in [&pem, &der] {
            match Trust::pinned_from_file(path).unwrap() {
                Trust::PinnedCertDer(d) => assert_eq!(d, cert.cert.der().to_vec()),
                other => panic!("expected a pin, got {other:?}"),
            }
        }
        assert!(Trust::pinned_from_file(&junk).is_err());
        assert!(Trust::pinned_from_file(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rustls_config_offers_h3_alpn() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cfg = rustls_config(&Trust::CaPem(cert.cert.pem().into_bytes())).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![b"h3".to_vec()]);
        assert!(rustls_config(&Trust::PinnedCertDer(cert.cert.der().to_vec())).is_ok());
        assert!(matches!(
            rustls_config(&Trust::CaPem(b"not pem".to_vec())),
            Err(ClientError::Tls(_))
        ));
    }
}
