//! Typed values parsed out of configuration strings once, when the file is read: destination port
//! ranges and token hashes. Their parse errors name the key they belong to.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An inclusive range of destination ports, written `"443"` or `"8000-8999"`; never port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// Every port a destination can have.
    pub const ALL: PortRange = PortRange {
        first: 1,
        last: u16::MAX,
    };

    /// One port; `None` for port 0.
    pub fn single(port: u16) -> Option<PortRange> {
        (port != 0).then_some(PortRange {
            first: port,
            last: port,
        })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(entry: &str) -> Result<Self, String> {
        let (lo, hi) = match entry.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (entry.trim(), entry.trim()),
        };
        let port = |s: &str| {
            s.parse::<u16>()
                .map_err(|_| format!("`{entry}` is not a port or port range"))
        };
        let (first, last) = (port(lo)?, port(hi)?);
        if first == 0 || first > last {
            return Err(format!(
                "`{entry}`: ranges must be within 1-65535 and ascending"
            ));
        }
        Ok(PortRange { first, last })
    }
}

// Only `policy.ports` holds port ranges; the key is named here because TOML parse errors name
// the line, not the dotted key.
impl TryFrom<String> for PortRange {
    type Error = String;

    fn try_from(entry: String) -> Result<Self, String> {
        entry.parse().map_err(|e| format!("policy.ports: {e}"))
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The SHA-256 of a bearer token, written as 64 hex digits; the relay never stores tokens.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// The hash of a plaintext token, the form tokens are configured in.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }
}

impl std::str::FromStr for TokenHash {
    type Err = String;

    fn from_str(hex_hash: &str) -> Result<Self, String> {
        let bytes =
            hex::decode(hex_hash.trim()).map_err(|_| "token hash is not hex".to_string())?;
        let hash: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "token hash must be 32 bytes (64 hex digits) of SHA-256".to_string())?;
        Ok(TokenHash(hash))
    }
}

// In the config file token hashes are `auth.token_sha256` entries (`auth.token_file` lines are
// parsed with `FromStr` and named by the caller).
impl TryFrom<String> for TokenHash {
    type Error = String;

    fn try_from(hex_hash: String) -> Result<Self, String> {
        hex_hash
            .parse()
            .map_err(|e| format!("auth.token_sha256: {e}"))
    }
}

impl From<TokenHash> for String {
    fn from(h: TokenHash) -> String {
        hex::encode(h.0)
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", hex::encode(self.0))
    }
}
