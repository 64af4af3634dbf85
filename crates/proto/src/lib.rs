//! Sans-IO wire formats for cfr: no sockets, no async, no clocks.
//!
//! Every parser is a pure function over bytes that distinguishes *incomplete* input (wait for more)
//! from *malformed* input (abort the stream), and is fuzzed from `fuzz/`.
#![forbid(unsafe_code)]

pub mod capsule;
pub mod datagram;
pub mod fuzzing;
pub mod http1;
pub mod proxy_status;
pub mod pvd;
pub mod socks5;
pub mod target;
pub mod template;
pub mod varint;

pub use capsule::{Capsule, CapsuleDecoder};
pub use proxy_status::{ProxyError, ProxyStatus};
pub use target::{Host, Target, TargetError};
pub use template::{TemplateError, UdpTemplate};

/// Why a decoder could not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More bytes are needed; nothing was consumed.
    #[error("incomplete input")]
    Incomplete,
    /// The bytes can never form a valid value; the stream carrying them must be aborted.
    #[error("malformed input: {0}")]
    Malformed(&'static str),
}
