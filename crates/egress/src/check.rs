//! Host diagnostics for an egress configuration (`cfr egress check`).

use std::fmt;

use crate::EgressConfig;

/// Result of [`diagnose`]: human-readable findings with fix commands.
#[derive(Debug, Clone, Default)]
pub struct Report {
    lines: Vec<String>,
    errors: usize,
}

impl Report {
    /// No finding that prevents source privacy from working.
    pub fn ok(&self) -> bool {
        self.errors == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

/// Checks the host for what `cfg` needs.
pub fn diagnose(cfg: &EgressConfig) -> Report {
    let _ = cfg;
    Report::default()
}
