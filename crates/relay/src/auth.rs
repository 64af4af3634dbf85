//! Client authentication: bearer tokens (stored as SHA-256 hashes, compared in constant time) and
//! optionally a client certificate (mTLS). Runs before any DNS lookup or dial.
use std::path::Path;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, ConfigError, TokenHash};

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Allowed,
    /// No credentials were presented (answer 407 with a challenge).
    Missing,
    /// Credentials were presented and are wrong.
    Invalid,
}

/// Configured credentials.
#[derive(Clone)]
pub struct Authenticator {
    hashes: Vec<[u8; 32]>,
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
        Ok(Self {
            hashes,
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

    /// Checks one request. `client_cert_verified`: the TLS layer verified a client certificate.
    pub fn check(&self, headers: &HeaderMap, client_cert_verified: bool) -> AuthOutcome {
        if self.open {
            return AuthOutcome::Allowed;
        }
        let token = bearer(headers, http::header::PROXY_AUTHORIZATION)
            .or_else(|| bearer(headers, http::header::AUTHORIZATION));
        let token_ok = token.map(|t| self.token_matches(t));
        if self.require_client_cert {
            return match (client_cert_verified, token_ok) {
                (true, Some(true)) => AuthOutcome::Allowed,
                (_, Some(false)) => AuthOutcome::Invalid,
                _ => AuthOutcome::Missing,
            };
        }
        if self.mtls && client_cert_verified {
            return AuthOutcome::Allowed;
        }
        match token_ok {
            Some(true) => AuthOutcome::Allowed,
            Some(false) => AuthOutcome::Invalid,
            None => AuthOutcome::Missing,
        }
    }

    fn token_matches(&self, token: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(token).into();
        // Compare against every hash without an early exit so timing says nothing about which
        // (or whether a) token matched.
        let mut ok = subtle::Choice::from(0u8);
        for h in &self.hashes {
            ok |= h.ct_eq(&digest);
        }
        bool::from(ok)
    }
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
        assert_eq!(a.check(&HeaderMap::new(), false), AuthOutcome::Missing);
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer s3cret"), false),
            AuthOutcome::Allowed
        );
        assert_eq!(
            a.check(&headers("authorization", "bearer s3cret"), false),
            AuthOutcome::Allowed
        );
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer wrong"), false),
            AuthOutcome::Invalid
        );
        assert_eq!(
            a.check(&headers("proxy-authorization", "Basic czNjcmV0"), false),
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
        assert_eq!(a.check(&HeaderMap::new(), true), AuthOutcome::Allowed);
        assert_eq!(a.check(&HeaderMap::new(), false), AuthOutcome::Missing);
        let cfg = AuthConfig {
            client_ca: Some("ca.pem".into()),
            require_client_cert: true,
            ..Default::default()
        };
        let a = Authenticator::new(&cfg, &["tok".into()]).unwrap();
        assert_eq!(a.check(&HeaderMap::new(), true), AuthOutcome::Missing);
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer tok"), true),
            AuthOutcome::Allowed
        );
        assert_eq!(
            a.check(&headers("proxy-authorization", "Bearer tok"), false),
            AuthOutcome::Missing
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
