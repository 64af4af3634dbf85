//! Sealing key files: TOML, one kind per file, the sealing schedule in every file.
//!
//! ```toml
//! kind = "master"          # or "relay" (a chain key from `epoch` on), or "share" (k-of-n share)
//! origin = 1764720000      # Unix time of epoch 0
//! epoch_secs = 3600
//! handle_bits = 20
//! check_bits = 20
//! key = "…64 hex…"         # master and relay
//! epoch = 12               # relay: the chain key's epoch
//! threshold = 2            # share: shares needed
//! share = "…hex…"          # share: x ‖ y (Shamir over GF(256), `blahaj`)
//! key_id = "…16 hex…"      # share: fingerprint of the master key (not secret)
//! ```
//!
//! Parsing is a pure function over untrusted bytes (fuzz target `seal_key_file`); errors name the
//! field, never echo a value.

use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{ChainKey, MasterKey, SealError, SealParams};

/// A parsed key file.
#[derive(Debug, Clone)]
pub enum KeyFile {
    /// Opens every epoch; can seal (the relay derives its chain key and erases the master).
    Master { params: SealParams, key: MasterKey },
    /// A chain key: seals and opens from `chain.epoch()` on, never earlier.
    Relay { params: SealParams, chain: ChainKey },
    /// One Shamir share of a master key; `threshold` of them recombine it.
    Share {
        params: SealParams,
        threshold: u8,
        key_id: [u8; 8],
        /// x ‖ y, as `blahaj` encodes a share.
        share: Zeroizing<Vec<u8>>,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyFile {
    kind: String,
    origin: u64,
    epoch_secs: u64,
    handle_bits: u32,
    check_bits: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    share: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
}

impl Drop for RawKeyFile {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.key.zeroize();
        self.share.zeroize();
    }
}

fn field_error(field: &'static str, message: &str) -> SealError {
    SealError::KeyFile {
        field,
        message: message.to_owned(),
    }
}

fn required<T: Clone>(v: &Option<T>, field: &'static str, kind: &str) -> Result<T, SealError> {
    v.clone()
        .ok_or_else(|| field_error(field, &format!("required for kind = \"{kind}\"")))
}

fn forbidden<T>(v: &Option<T>, field: &'static str, kind: &str) -> Result<(), SealError> {
    match v {
        Some(_) => Err(field_error(
            field,
            &format!("not allowed for kind = \"{kind}\""),
        )),
        None => Ok(()),
    }
}

fn hex_array<const N: usize>(
    v: &Option<String>,
    field: &'static str,
    kind: &str,
) -> Result<Zeroizing<[u8; N]>, SealError> {
    let text = Zeroizing::new(required(v, field, kind)?);
    let mut out = Zeroizing::new([0u8; N]);
    hex::decode_to_slice(text.trim(), out.as_mut())
        .map_err(|_| field_error(field, &format!("must be {} hex digits", 2 * N)))?;
    Ok(out)
}

impl KeyFile {
    /// Parses key-file bytes. Never panics; errors name the field (or the line of a TOML syntax
    /// error) and never contain key material.
    pub fn parse(bytes: &[u8]) -> Result<Self, SealError> {
        let text = std::str::from_utf8(bytes).map_err(|_| field_error("file", "not UTF-8"))?;
        let raw: RawKeyFile = toml::from_str(text).map_err(|e| {
            // `toml`'s Display quotes the offending line, which may hold the key: report only the
            // message and line number.
            let line = e.span().map_or(0, |s| {
                text[..s.start.min(text.len())].lines().count().max(1)
            });
            SealError::KeyFile {
                field: "file",
                message: format!("line {line}: {}", e.message()),
            }
        })?;
        let params = SealParams {
            origin: raw.origin,
            epoch_secs: raw.epoch_secs,
            handle_bits: raw.handle_bits,
            check_bits: raw.check_bits,
        };
        params.validate()?;
        let kind = raw.kind.as_str();
        match kind {
            "master" => {
                forbidden(&raw.epoch, "epoch", kind)?;
                forbidden(&raw.threshold, "threshold", kind)?;
                forbidden(&raw.share, "share", kind)?;
                forbidden(&raw.key_id, "key_id", kind)?;
                let key = hex_array::<32>(&raw.key, "key", kind)?;
                Ok(KeyFile::Master {
                    params,
                    key: MasterKey::from_bytes(*key),
                })
            }
            "relay" => {
                forbidden(&raw.threshold, "threshold", kind)?;
                forbidden(&raw.share, "share", kind)?;
                forbidden(&raw.key_id, "key_id", kind)?;
                let epoch = required(&raw.epoch, "epoch", kind)?;
                let key = hex_array::<32>(&raw.key, "key", kind)?;
                Ok(KeyFile::Relay {
                    params,
                    chain: ChainKey::from_bytes(epoch, *key),
                })
            }
            "share" => {
                forbidden(&raw.key, "key", kind)?;
                forbidden(&raw.epoch, "epoch", kind)?;
                let threshold = required(&raw.threshold, "threshold", kind)?;
                if threshold < 2 {
                    return Err(field_error("threshold", "must be at least 2"));
                }
                let key_id = *hex_array::<8>(&raw.key_id, "key_id", kind)?;
                let text = Zeroizing::new(required(&raw.share, "share", kind)?);
                let share = Zeroizing::new(
                    hex::decode(text.trim()).map_err(|_| field_error("share", "must be hex"))?,
                );
                // x = 0 would be the secret itself; blahaj issues x in 1..=255.
                if share.len() != 33 || share[0] == 0 {
                    return Err(field_error(
                        "share",
                        "must be 33 bytes: a non-zero x and 32 bytes of y",
                    ));
                }
                Ok(KeyFile::Share {
                    params,
                    threshold,
                    key_id,
                    share,
                })
            }
            _ => Err(field_error(
                "kind",
                "must be \"master\", \"relay\" or \"share\"",
            )),
        }
    }

    pub fn params(&self) -> &SealParams {
        match self {
            KeyFile::Master { params, .. }
            | KeyFile::Relay { params, .. }
            | KeyFile::Share { params, .. } => params,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            KeyFile::Master { .. } => "master",
            KeyFile::Relay { .. } => "relay",
            KeyFile::Share { .. } => "share",
        }
    }

    /// The file's text, with a comment saying what it opens and who should hold it.
    pub fn render(&self) -> Zeroizing<String> {
        let p = self.params();
        let mut raw = RawKeyFile {
            kind: self.kind().to_owned(),
            origin: p.origin,
            epoch_secs: p.epoch_secs,
            handle_bits: p.handle_bits,
            check_bits: p.check_bits,
            key: None,
            epoch: None,
            threshold: None,
            share: None,
            key_id: None,
        };
        let comment = match self {
            KeyFile::Master { key, .. } => {
                raw.key = Some(hex::encode(key.as_bytes()));
                "# cfr sealing MASTER key: opens every sealed egress address since `origin`.\n\
                 # Keep it offline with the party accountable for answering lawful requests; mode 0600.\n"
            }
            KeyFile::Relay { chain, .. } => {
                raw.key = Some(hex::encode(chain.as_bytes()));
                raw.epoch = Some(chain.epoch());
                "# cfr sealing RELAY key: seals (and opens) addresses from epoch `epoch` on, never earlier.\n\
                 # Give it to the relay (egress.sealing_key); mode 0600.\n"
            }
            KeyFile::Share {
                threshold,
                key_id,
                share,
                ..
            } => {
                raw.threshold = Some(*threshold);
                raw.key_id = Some(hex::encode(key_id));
                raw.share = Some(hex::encode(share.as_slice()));
                "# cfr sealing key SHARE: `threshold` shares of the same key_id recombine the master key.\n\
                 # One operator holds one share; mode 0600.\n"
            }
        };
        let body = Zeroizing::new(toml::to_string(&raw).expect("plain fields serialize"));
        Zeroizing::new(format!("{comment}{}", body.as_str()))
    }
}

/// Splits a master key into `n` shares of which any `threshold` recombine it (Shamir over GF(256),
/// `blahaj`, shares at x = 1..=n).
pub fn split_master(
    params: SealParams,
    master: &MasterKey,
    threshold: u8,
    n: u8,
) -> Result<Vec<KeyFile>, SealError> {
    if threshold < 2 || n < threshold {
        return Err(SealError::Shares(format!(
            "need 2 ≤ k ≤ n ≤ 255, got {threshold}/{n}"
        )));
    }
    let key_id = master.key_id();
    Ok(blahaj::Sharks(threshold)
        .dealer(master.as_bytes())
        .take(usize::from(n))
        .map(|s| KeyFile::Share {
            params,
            threshold,
            key_id,
            share: Zeroizing::new(Vec::from(&s)),
        })
        .collect())
}

/// Recombines a master key from share files: all of one key (same key_id, schedule and threshold),
/// at least `threshold` distinct ones; the result must have the shares' key_id.
pub fn combine_shares(files: &[KeyFile]) -> Result<(SealParams, MasterKey), SealError> {
    let mut shares = Vec::new();
    let mut first: Option<(SealParams, u8, [u8; 8])> = None;
    for f in files {
        let KeyFile::Share {
            params,
            threshold,
            key_id,
            share,
        } = f
        else {
            return Err(SealError::Shares(format!(
                "a {} key file is not a share",
                f.kind()
            )));
        };
        let this = (*params, *threshold, *key_id);
        match first {
            None => first = Some(this),
            Some(f) if f != this => {
                return Err(SealError::Shares(
                    "shares belong to different keys or schedules".into(),
                ))
            }
            Some(_) => {}
        }
        let s = blahaj::Share::try_from(share.as_slice())
            .map_err(|e| SealError::Shares(e.to_owned()))?;
        shares.push(s);
    }
    let Some((params, threshold, key_id)) = first else {
        return Err(SealError::Shares("no shares given".into()));
    };
    let distinct: std::collections::HashSet<u8> = shares.iter().map(|s| s.x.0).collect();
    if distinct.len() < usize::from(threshold) {
        return Err(SealError::Shares(format!(
            "{} distinct shares given, {threshold} needed",
            distinct.len()
        )));
    }
    let secret = Zeroizing::new(
        blahaj::Sharks(threshold)
            .recover(&shares)
            .map_err(|e| SealError::Shares(e.to_owned()))?,
    );
    let bytes: [u8; 32] = secret
        .as_slice()
        .try_into()
        .map_err(|_| SealError::Shares("recovered key has the wrong length".into()))?;
    let master = MasterKey::from_bytes(bytes);
    if master.key_id() != key_id {
        return Err(SealError::Shares(
            "shares do not recombine to their key (corrupt or mixed shares)".into(),
        ));
    }
    Ok((params, master))
}

/// Writes a key file readable by its owner only; never overwrites an existing file.
pub fn write_key_file(path: &Path, file: &KeyFile) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(file.render().as_bytes())?;
    f.sync_all()
}

/// Fuzz property for the key-file parser (`fuzz/fuzz_targets/seal_key_file.rs` and the corpus
/// replay test): parsing arbitrary bytes never panics, an error never contains the input's hex
/// runs, and a file that parses renders to text that parses to the same file.
pub fn fuzz_key_file(data: &[u8]) {
    match KeyFile::parse(data) {
        Err(e) => {
            let msg = e.to_string();
            if let Ok(text) = std::str::from_utf8(data) {
                for word in text.split(|c: char| !c.is_ascii_hexdigit()) {
                    if word.len() >= 16 {
                        assert!(!msg.contains(word), "error echoes input: {msg}");
                    }
                }
            }
        }
        Ok(file) => {
            let rendered = file.render();
            let again = KeyFile::parse(rendered.as_bytes()).unwrap_or_else(|e| {
                panic!("a parsed key file must re-parse from its rendering: {e}")
            });
            assert_eq!(
                again.render().as_str(),
                rendered.as_str(),
                "render → parse → render must be stable"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: SealParams = SealParams {
        origin: 1_764_720_000,
        epoch_secs: 3600,
        handle_bits: 20,
        check_bits: 20,
    };

    #[test]
    fn every_kind_round_trips() {
        let m = MasterKey::from_bytes([0xab; 32]);
        let files = [
            KeyFile::Master {
                params: P,
                key: m.clone(),
            },
            KeyFile::Relay {
                params: P,
                chain: m.chain_at(7),
            },
        ]
        .into_iter()
        .chain(split_master(P, &m, 2, 3).unwrap());
        for f in files {
            let text = f.render();
            let again = KeyFile::parse(text.as_bytes()).unwrap();
            assert_eq!(again.render().as_str(), text.as_str());
            assert_eq!(again.params(), &P);
            fuzz_key_file(text.as_bytes());
        }
    }

    #[test]
    fn k_of_n_shares_recombine_and_fewer_or_mixed_do_not() {
        let m = MasterKey::from_bytes([0x11; 32]);
        let shares = split_master(P, &m, 2, 3).unwrap();
        for pair in [[0, 1], [1, 2], [0, 2]] {
            let chosen: Vec<KeyFile> = pair.iter().map(|&i| shares[i].clone()).collect();
            let (params, got) = combine_shares(&chosen).unwrap();
            assert_eq!(got.as_bytes(), m.as_bytes());
            assert_eq!(params, P);
        }
        let err = combine_shares(&shares[..1]).unwrap_err().to_string();
        assert!(err.contains("1 distinct shares given, 2 needed"), "{err}");
        let err = combine_shares(&[shares[0].clone(), shares[0].clone()]).unwrap_err();
        assert!(err.to_string().contains("distinct"), "{err}");
        let other = split_master(P, &MasterKey::from_bytes([0x22; 32]), 2, 3).unwrap();
        let err = combine_shares(&[shares[0].clone(), other[1].clone()]).unwrap_err();
        assert!(err.to_string().contains("different keys"), "{err}");
        assert!(split_master(P, &m, 1, 3).is_err());
        assert!(split_master(P, &m, 4, 3).is_err());
    }

    #[test]
    fn bad_files_name_the_field_and_never_echo_the_key() {
        let secret = "00112233445566778899aabbccddeeff00112233445566778899aabbccddee";
        let cases = [
            (format!("kind = \"master\"\norigin = 0\nepoch_secs = 3600\nhandle_bits = 20\ncheck_bits = 20\nkey = \"{secret}\"\n"), "key"),
            (format!("kind = \"master\"\norigin = 0\nepoch_secs = 0\nhandle_bits = 20\ncheck_bits = 20\nkey = \"{secret}ff\"\n"), "epoch_secs"),
            (format!("kind = \"relay\"\norigin = 0\nepoch_secs = 60\nhandle_bits = 20\ncheck_bits = 20\nkey = \"{secret}ff\"\n"), "epoch"),
            (format!("kind = \"master\"\norigin = 0\nepoch_secs = 60\nhandle_bits = 20\ncheck_bits = 20\nkey = \"{secret}ff\"\nextra = 1\n"), "extra"),
            (format!("kind = \"boss\"\norigin = 0\nepoch_secs = 60\nhandle_bits = 20\ncheck_bits = 20\nkey = \"{secret}ff\"\n"), "kind"),
            (format!("kind = \"master\"\norigin = 0\nepoch_secs = 60\nhandle_bits = 20\ncheck_bits = 20\nkey = {secret}ff\n"), "line 6"),
        ];
        for (text, expect) in cases {
            let msg = KeyFile::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(msg.contains(expect), "expected {expect:?} in {msg:?}");
            assert!(!msg.contains(&secret[..16]), "error echoes the key: {msg}");
            fuzz_key_file(text.as_bytes());
        }
    }
}
