//! `cfr client`: local SOCKS5 / HTTP proxy listeners that tunnel through one or more relays.
use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Relay URL, e.g. https://relay.example:4433 (repeatable).
    #[arg(long = "relay", required = true)]
    pub relay: Vec<String>,
}

pub async fn run(args: ClientArgs) -> Result<ExitCode, String> {
    let _ = args;
    Err("cfr client: not wired yet".into())
}
