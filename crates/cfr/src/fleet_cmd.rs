//! `cfr fleet ...`, `cfr relay --fleet FILE --instance ID` and `cfr check-config FLEET_FILE`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use cfr_fleet::nft::{self, Options};
use cfr_fleet::FleetConfig;
use cfr_relay::config::RelayConfig;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Print the nftables ruleset (and the policy-routing commands for members on other hosts).
    Nft(BalancerArgs),
    /// Load the ruleset with `nft -f -` and install the policy routes; re-run to drain a member.
    Apply(BalancerArgs),
}

#[derive(Args, Debug)]
pub struct BalancerArgs {
    /// The fleet file.
    #[arg(long)]
    fleet: PathBuf,
    /// This host's name in `[fleet.hosts]` (members elsewhere are reached by policy routing);
    /// absent: the members without a `host`.
    #[arg(long)]
    host: Option<String>,
    /// Member id that takes no new connections (repeatable), on top of `fleet.draining`.
    #[arg(long = "drain", value_name = "ID")]
    drain: Vec<u32>,
}

pub fn run(command: FleetCommand) -> Result<ExitCode, String> {
    match command {
        FleetCommand::Nft(args) => {
            let (rules, routes) = render(&args)?;
            print!("{rules}");
            for r in &routes {
                println!("# policy route: ip {}", r.join(" "));
            }
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Apply(args) => apply(&args),
    }
}

fn load(file: &Path) -> Result<FleetConfig, String> {
    FleetConfig::from_file(file).map_err(|e| format!("invalid fleet file: {e}"))
}

fn render(args: &BalancerArgs) -> Result<(String, Vec<Vec<String>>), String> {
    let fleet = load(&args.fleet)?;
    let opts = Options {
        this_host: args.host.clone(),
        drain: args.drain.clone(),
    };
    let rules = nft::ruleset(&fleet, &opts).map_err(|e| e.to_string())?;
    Ok((rules, nft::routes(&fleet, &opts)))
}

fn apply(args: &BalancerArgs) -> Result<ExitCode, String> {
    let (rules, routes) = render(args)?;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft (Debian package nftables): {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())
        .map_err(|e| format!("nft: {e}"))?;
    let status = child.wait().map_err(|e| format!("nft: {e}"))?;
    if !status.success() {
        return Err(format!("nft -f rejected the ruleset ({status})"));
    }
    let removed = remove_stale_rules(&routes)?;
    for cmd in &routes {
        // `ip rule add` is not idempotent: remove earlier copies of the same rule first.
        if cmd.get(1).map(String::as_str) == Some("rule") {
            let mut del = cmd.clone();
            del[2] = "del".into();
            while Command::new("ip")
                .args(&del)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {}
        }
        let status = Command::new("ip")
            .args(cmd)
            .status()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !status.success() {
            return Err(format!("`ip {}` failed ({status})", cmd.join(" ")));
        }
    }
    eprintln!(
        "cfr fleet: balancer ruleset loaded (table inet {}), {} policy-routing command(s), {} stale rule(s) removed",
        nft::TABLE,
        routes.len(),
        removed
    );
    Ok(ExitCode::SUCCESS)
}

/// Removes the policy-routing rules (and flushes the routing tables) of members an earlier `apply`
/// routed to another host but this file no longer does: a member deleted from the file, moved to
/// this host, or a host renumbered. Returns how many rules went.
fn remove_stale_rules(routes: &[Vec<String>]) -> Result<usize, String> {
    let mut removed = 0;
    for family in ["-4", "-6"] {
        let priority = nft::RULE_PRIORITY.to_string();
        let out = Command::new("ip")
            .args(["-j", family, "rule", "show", "priority", &priority])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip -j {family} rule show` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let installed = nft::installed_rule_marks(&String::from_utf8_lossy(&out.stdout))?;
        let wanted = nft::wanted_rule_marks(routes, family);
        for m in installed.iter().filter(|m| !wanted.contains(m)) {
            let m = m.to_string();
            let del = [
                family, "rule", "del", "fwmark", &m, "lookup", &m, "priority", &priority,
            ];
            let status = Command::new("ip")
                .args(del)
                .status()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if !status.success() {
                return Err(format!("`ip {}` failed ({status})", del.join(" ")));
            }
            // The table may already be empty; only the rule decides where packets go.
            let _ = Command::new("ip")
                .args([family, "route", "flush", "table", &m])
                .stderr(Stdio::null())
                .status();
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether `file` is a fleet file rather than a relay config (`cfr check-config` takes both).
pub fn is_fleet_file(file: &Path) -> bool {
    std::fs::read_to_string(file).is_ok_and(|t| FleetConfig::is_fleet_toml(&t))
}

pub fn check(file: &Path) -> Result<ExitCode, String> {
    let fleet = load(file)?;
    // The one file members read at start that check-config can check too (mode, format).
    if let Some(first) = fleet.fleet.instances.first() {
        let member = fleet.member(first.id).map_err(|e| e.to_string())?;
        if let Some(lb) = &member.relay.quic_lb {
            lb.load().map_err(|e| format!("invalid fleet file: {e}"))?;
        }
    }
    println!("# {} is a valid fleet file. Members:", file.display());
    for inst in &fleet.fleet.instances {
        let shares: Vec<String> = fleet
            .egress_shares(inst.id)
            .iter()
            .map(ToString::to_string)
            .collect();
        println!(
            "#   {} listen {} server ID {} egress {}{}",
            inst.id,
            inst.listen,
            hex(&fleet.server_id(inst.id)),
            if shares.is_empty() {
                "(kernel-chosen)".to_owned()
            } else {
                shares.join(", ")
            },
            inst.host
                .as_ref()
                .map(|h| format!(" on host {h}"))
                .unwrap_or_default()
        );
    }
    print!("{}", fleet.to_toml());
    Ok(ExitCode::SUCCESS)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Member `id`'s relay configuration, for `cfr relay --fleet FILE --instance ID`.
pub fn member_config(file: &Path, id: u32) -> Result<RelayConfig, String> {
    let fleet = load(file)?;
    let member = fleet.member(id).map_err(|e| e.to_string())?;
    tracing::info!(
        instance = member.id,
        server_id = %hex(&member.server_id),
        "fleet member"
    );
    Ok(member.relay)
}
