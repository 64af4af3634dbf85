//! Client authentication: bearer tokens (stored as SHA-256 hashes, compared in constant time) and
//! optionally a client certificate (mTLS). Runs before any DNS lookup or dial.
use std::path::Path;

use cfr_egress::Subscriber;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::{AuthConfig, ConfigError, TokenHash};

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Authenticated, as this subscriber (anonymous without an `auth.subscribers` entry).
    Allowed(Subscriber),
    /// No credentials were presented (answer 407 with a challenge).
    Missing,
    /// Credentials were presented and are wrong.
    Invalid,
}

/// Configured credentials.
#[derive(Clone)]
pub struct Authenticator {
    /// Accepted token hashes with their subscriber handle (0: none).
    hashes: Vec<([u8; 32], u32)>,
    /// Client certificate SHA-256 → subscriber handle.
    cert_handles: Vec<([u8; 32], u32)>,
    mtls: bool,
    require_client_cert: bool,
    open: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("tokens", &self.hashes.len())
            .field("mtls", &self.mtls)
            .field("open", &self.open)
            .finish()
    }
}

impl Authenticator {
    /// Builds from config plus any extra plaintext tokens (the generated dev token).
    pub fn new(cfg: &AuthConfig, extra_tokens: &[String]) -> Result<Self, ConfigError> {
        let mut hashes: Vec<[u8; 32]> = cfg.token_sha256.iter().map(|h| h.0).collect();
        if let Some(file) = &cfg.token_file {
            let text = std::fs::read_to_string(file).map_err(|source| ConfigError::TokenFile {
                path: file.clone(),
                source,
            })?;
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                let hash: TokenHash = line.parse().map_err(|message| ConfigError::Invalid {
                    key: "auth.token_file",
                    message,
                })?;
                hashes.push(hash.0);
            }
        }
        hashes.extend(extra_tokens.iter().map(|t| TokenHash::of(t).0));
        let handle_of = |h: [u8; 32]| {
            cfg.subscribers
                .tokens
                .get(&TokenHash(h))
                .copied()
                .unwrap_or(0)
        };
        Ok(Self {
            hashes: hashes.into_iter().map(|h| (h, handle_of(h))).collect(),
            cert_handles: cfg
                .subscribers
                .client_certs
                .iter()
                .map(|(h, &handle)| (h.0, handle))
                .collect(),
            mtls: cfg.client_ca.is_some(),
            require_client_cert: cfg.require_client_cert,
            open: cfg.insecure_open_relay,
        })
    }

    /// True when neither tokens nor mTLS are configured and the relay is not explicitly open.
    pub fn has_credentials(&self) -> bool {
        !self.hashes.is_empty() || self.mtls
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Number of accepted tokens that have no subscriber handle (their tunnels are sealed as
    /// anonymous).
    pub fn credentials_without_handle(&self) -> usize {
        self.hashes.iter().filter(|(_, h)| *h == 0).count()
    }

    /// Every configured subscriber handle (for range checks against the sealing key).
    pub fn handles(&self) -> impl Iterator<Item = u32> + '_ {
        self.hashes
            .iter()
            .chain(&self.cert_handles)
            .map(|&(_, h)| h)
            .filter(|&h| h != 0)
    }

    /// The subscriber a verified client certificate (leaf, DER) stands for.
    pub fn client_cert_subscriber(&self, leaf_der: &[u8]) -> Subscriber {
        let digest: [u8; 32] = Sha256::digest(leaf_der).into();
        Subscriber(select_handle(&self.cert_handles, &digest).unwrap_or(0))
    }

    /// Checks one request. `client_cert`: the subscriber of the client certificate the TLS layer
    /// verified, if any.
    pub fn check(&self, headers: &HeaderMap, client_cert: Option<Subscriber>) -> AuthOutcome {
        if self.open {
            return AuthOutcome::Allowed(Subscriber::ANONYMOUS);
        }
        let token = bearer(headers, http::header::PROXY_AUTHORIZATION)
            .or_else(|| bearer(headers, http::header::AUTHORIZATION));
        let token_ok = token.map(|t| self.token_subscriber(t));
        if self.require_client_cert {
            // Both credentials: the token names the subscriber, the certificate if it does not.
            return match (client_cert, token_ok) {
                (Some(cert), Some(Some(tok))) => {
                    AuthOutcome::Allowed(if tok == Subscriber::ANONYMOUS {
                        cert
                    } else {
                        tok
                    })
                }
                (_, Some(None)) => AuthOutcome::Invalid,
                _ => AuthOutcome::Missing,
            };
        }
        if let (true, Some(cert)) = (self.mtls, client_cert) {
            return AuthOutcome::Allowed(cert);
        }
        match token_ok {
            Some(Some(s)) => AuthOutcome::Allowed(s),
            Some(None) => AuthOutcome::Invalid,
            None => AuthOutcome::Missing,
        }
    }

    /// `Some(subscriber)` when the token is accepted.
    fn token_subscriber(&self, token: &[u8]) -> Option<Subscriber> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        select_handle(&self.hashes, &digest).map(Subscriber)
    }
}

/// The handle paired with `digest`, compared against every entry without an early exit so timing
/// says nothing about which (or whether an) entry matched.
fn select_handle(entries: &[([u8; 32], u32)], digest: &[u8; 32]) -> Option<u32> {
    let mut found = subtle::Choice::from(0u8);
    let mut handle = 0u32;
    for (h, entry_handle) in entries {
        let eq = h.ct_eq(digest);
        handle.conditional_assign(entry_handle, eq);
        found |= eq;
    }
    bool::from(found).then_some(handle)
}

fn bearer(headers: &HeaderMap, name: http::header::HeaderName) -> Option<&[u8]> {
    let v = headers.get(name)?.as_bytes();
    let (scheme, rest) = split_once(v, b' ')?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Some(b"");
    }
    Some(trim(rest))
}

fn split_once(v: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = v.iter().position(|&b| b == sep)?;
    Some((&v[..i], &v[i + 1..]))
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Loads the dev token from `dir/token`, or creates one (32 random bytes, hex) with mode 0600.
pub fn load_or_create_dev_token(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    std::fs::create_dir_all(dir)?;
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    let token = hex::encode(bytes);
    write_private(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        h
    }

    #[test]
    fn bearer_tokens_are_checked_against_hashes() {
        let cfg = AuthConfig {
            token_sha256: vec![TokenHash::of("s3cret")],
            ..Default::default()
        };
        let a = Authenticator::new(&cfg, &[]).unwrap();
        let anon = AuthOutcome::Allowed(Subscriber::ANONYMOUS);
        assert_eq!(a.check(&HeaderMap::new(), None), AuthOutcome::Missing);
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer s3cret"), None),
            anon
        );
        assert_eq!(
            a.check(&headers("authorization", "bearer s3cret"), None),
            anon
        );
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer wrong"), None),
            AuthOutcome::Invalid
        );
        assert_eq!(
            a.check(&headers("proxy-authorization", "Basic czNjcmV0"), None),
            AuthOutcome::Invalid
        );
    }

    #[test]
    fn client_certificate_alone_is_enough_unless_both_are_required() {
        let cfg = AuthConfig {
            client_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        let a = Authenticator::new(&cfg, &["tok".into()]).unwrap();
        let anon = AuthOutcome::Allowed(Subscriber::ANONYMOUS);
        let cert = Some(Subscriber::ANONYMOUS);
        assert_eq!(a.check(&HeaderMap::new(), cert), anon);
        assert_eq!(a.check(&HeaderMap::new(), None), AuthOutcome::Missing);
        let cfg = AuthConfig {
            client_ca: Some("ca.pem".into()),
            require_client_cert: true,
            ..Default::default()
        };
        let a = Authenticator::new(&cfg, &["tok".into()]).unwrap();
        assert_eq!(a.check(&HeaderMap::new(), cert), AuthOutcome::Missing);
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer tok"), cert),
            anon
        );
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer tok"), None),
            AuthOutcome::Missing
        );
    }

    #[test]
    fn subscribers_come_from_the_token_or_the_client_certificate_never_the_credential() {
        let cert_der = b"not really DER, only hashed";
        let mut cfg = AuthConfig {
            token_sha256: vec![TokenHash::of("alice"), TokenHash::of("bob")],
            client_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        cfg.subscribers.tokens.insert(TokenHash::of("alice"), 7);
        cfg.subscribers
            .client_certs
            .insert(TokenHash(Sha256::digest(cert_der).into()), 9);
        let a = Authenticator::new(&cfg, &[]).unwrap();
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer alice"), None),
            AuthOutcome::Allowed(Subscriber(7))
        );
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer bob"), None),
            AuthOutcome::Allowed(Subscriber::ANONYMOUS),
            "an accepted token without a handle is anonymous"
        );
        let cert = a.client_cert_subscriber(cert_der);
        assert_eq!(cert, Subscriber(9));
        assert_eq!(
            a.check(&HeaderMap::new(), Some(cert)),
            AuthOutcome::Allowed(Subscriber(9))
        );
        assert_eq!(a.client_cert_subscriber(b"other"), Subscriber::ANONYMOUS);
        assert_eq!(a.credentials_without_handle(), 1);
        let mut handles: Vec<u32> = a.handles().collect();
        handles.sort_unstable();
        assert_eq!(handles, [7, 9]);
        // A handle for a hash that is no accepted token authenticates nothing.
        cfg.subscribers.tokens.insert(TokenHash::of("mallory"), 3);
        let a = Authenticator::new(&cfg, &[]).unwrap();
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer mallory"), None),
            AuthOutcome::Invalid
        );
    }

    #[test]
    fn dev_token_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t1 = load_or_create_dev_token(dir.path()).unwrap();
        let t2 = load_or_create_dev_token(dir.path()).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(dir.path().join("token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
