//! Host diagnostics for an egress configuration (`cfr egress check`): is each prefix routed to this
//! host, can a socket bind to its addresses, which families are covered; with the exact fix command
//! for each problem.
//!
//! The probe binds sockets only; it sends no traffic. It never prints the probed address.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::process::Command;

use ipnet::IpNet;

use crate::socket::{probe_bind, Proto};
use crate::{EgressConfig, EgressPool, Fallback};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Works as required.
    Ok,
    /// Context the operator should know; nothing to fix on this host.
    Info,
    /// Works, but without source privacy for some traffic, or not verifiable from here.
    Warn,
    /// Tunnels will fail or leak: must be fixed.
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        })
    }
}

/// One finding, with the commands that fix it (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Severity.
    pub level: Level,
    /// What was found.
    pub text: String,
    /// Shell commands (or config lines) that fix it, in order.
    pub fixes: Vec<String>,
}

/// Result of [`diagnose`]. `Display` prints one finding per line, each fix indented below it.
#[derive(Debug, Clone, Default)]
pub struct Report {
    findings: Vec<Finding>,
}

impl Report {
    /// No finding of level [`Level::Error`].
    pub fn ok(&self) -> bool {
        self.findings.iter().all(|f| f.level != Level::Error)
    }

    /// All findings, in the order they were made.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    fn push(&mut self, level: Level, text: impl Into<String>, fixes: Vec<String>) {
        self.findings.push(Finding {
            level,
            text: text.into(),
            fixes,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{:<6} {}", format!("{}:", finding.level), finding.text)?;
            for fix in &finding.fixes {
                writeln!(f, "       fix: {fix}")?;
            }
        }
        let errors = self
            .findings
            .iter()
            .filter(|x| x.level == Level::Error)
            .count();
        if errors == 0 {
            writeln!(f, "egress check passed")
        } else {
            writeln!(f, "egress check failed: {errors} problem(s)")
        }
    }
}

/// What the host looks like, gathered once so that the logic can be tested without a host.
#[derive(Debug, Clone)]
pub(crate) struct HostFacts {
    /// Prefixes of `local` routes (any table that delivers to this host), or why they are unknown.
    local_v4: Result<Vec<IpNet>, String>,
    local_v6: Result<Vec<IpNet>, String>,
    /// `net.ipv4.ip_nonlocal_bind`, `net.ipv6.ip_nonlocal_bind` (None: unreadable).
    nonlocal_bind_v4: Option<bool>,
    nonlocal_bind_v6: Option<bool>,
}

impl HostFacts {
    fn gather(need_v4: bool, need_v6: bool) -> Self {
        let unneeded = || Err("not needed".to_owned());
        HostFacts {
            local_v4: if need_v4 {
                ip_local_routes("-4")
            } else {
                unneeded()
            },
            local_v6: if need_v6 {
                ip_local_routes("-6").or_else(|ip_err| {
                    std::fs::read_to_string("/proc/net/ipv6_route")
                        .map(|s| parse_proc_ipv6_route(&s))
                        .map_err(|e| format!("{ip_err}; /proc/net/ipv6_route: {e}"))
                })
            } else {
                unneeded()
            },
            nonlocal_bind_v4: read_sysctl_bool("/proc/sys/net/ipv4/ip_nonlocal_bind"),
            nonlocal_bind_v6: read_sysctl_bool("/proc/sys/net/ipv6/ip_nonlocal_bind"),
        }
    }
}

fn ip_local_routes(family: &str) -> Result<Vec<IpNet>, String> {
    let out = Command::new("ip")
        .args([family, "route", "show", "table", "local"])
        .output()
        .map_err(|e| format!("could not run `ip {family} route show table local`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {family} route show table local` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_ip_local_routes(&String::from_utf8_lossy(&out.stdout)))
}

fn read_sysctl_bool(path: &str) -> Option<bool> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .map(|v| v != 0)
}

/// Prefixes of the `local` routes in `ip route show table local` output (either family). A bare
/// address is a /32 or /128. Other route types (broadcast, anycast, multicast) are ignored.
///
/// ```text
/// local 127.0.0.0/8 dev lo proto kernel scope host src 127.0.0.1
/// local 2001:db8:cf::/64 dev lo metric 1024 pref medium
/// ```
pub fn parse_ip_local_routes(output: &str) -> Vec<IpNet> {
    output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "local" {
                return None;
            }
            let dest = words.next()?;
            dest.parse::<IpNet>()
                .ok()
                .or_else(|| dest.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .collect()
}

/// Prefixes of the routes of type local (`RTF_LOCAL`, 0x80000000) in `/proc/net/ipv6_route`, which
/// lists every table. Columns: destination (32 hex digits), prefix length (hex), source, source length,
/// next hop, metric, refcount, use, flags (hex), device.
pub fn parse_proc_ipv6_route(contents: &str) -> Vec<IpNet> {
    const RTF_LOCAL: u32 = 0x8000_0000;
    contents
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                return None;
            }
            let flags = u32::from_str_radix(cols[8], 16).ok()?;
            if flags & RTF_LOCAL == 0 {
                return None;
            }
            let dest = u128::from_str_radix(cols[0], 16).ok()?;
            let len = u8::from_str_radix(cols[1], 16).ok()?;
            ipnet::Ipv6Net::new(dest.into(), len).ok().map(IpNet::V6)
        })
        .collect()
}

/// Checks the host for what `cfg` needs: a valid config, a local route for each prefix, a working
/// freebind bind (UDP and TCP) to a random address of each prefix, and which families are covered.
pub fn diagnose(cfg: &EgressConfig) -> Report {
    let need_v4 = cfg.prefixes.iter().any(|p| matches!(p, IpNet::V4(_)));
    let need_v6 = cfg.prefixes.iter().any(|p| matches!(p, IpNet::V6(_)));
    diagnose_with(cfg, &HostFacts::gather(need_v4, need_v6), &probe_bind)
}

pub(crate) fn diagnose_with(
    cfg: &EgressConfig,
    facts: &HostFacts,
    bind: &dyn Fn(IpAddr, Proto) -> io::Result<()>,
) -> Report {
    let mut r = Report::default();
    let pool = match EgressPool::new(cfg) {
        Ok(pool) => pool,
        Err(e) => {
            r.push(
                Level::Error,
                e.to_string(),
                vec!["correct the [egress] section of the configuration".into()],
            );
            return r;
        }
    };
    if pool.is_empty() {
        r.push(
            Level::Warn,
            "no egress prefixes configured: every tunnel leaves from this host's own address (no source privacy)",
            vec!["add prefixes routed to this host, e.g. `prefixes = [\"2001:db8:cf::/64\"]`, then route them: `ip -6 route add local 2001:db8:cf::/64 dev lo`".into()],
        );
        return r;
    }
    family_coverage(&mut r, &pool, cfg.fallback);
    for &prefix in pool.prefixes() {
        check_prefix(&mut r, prefix, facts, bind);
    }
    r
}

fn family_coverage(r: &mut Report, pool: &EgressPool, fallback: Fallback) {
    for v6 in [false, true] {
        let name = if v6 { "IPv6" } else { "IPv4" };
        let nets: Vec<&IpNet> = pool
            .prefixes()
            .iter()
            .filter(|p| matches!(p, IpNet::V6(_)) == v6)
            .collect();
        if nets.is_empty() {
            match fallback {
                Fallback::System => r.push(
                    Level::Warn,
                    format!("{name} destinations have no egress prefix: they leave from this host's own address (fallback = system, no source privacy)"),
                    vec![format!("add an {name} prefix, or set `fallback = \"refuse\"` to refuse {name} destinations")],
                ),
                Fallback::Refuse => r.push(
                    Level::Info,
                    format!("{name} destinations have no egress prefix and are refused (fallback = refuse)"),
                    vec![],
                ),
            }
        } else {
            let sizes: Vec<String> = nets
                .iter()
                .map(|p| format!("{p} (2^{} addresses)", p.max_prefix_len() - p.prefix_len()))
                .collect();
            r.push(
                Level::Ok,
                format!("{name} destinations use {}", sizes.join(", ")),
                vec![],
            );
        }
    }
}

fn check_prefix(
    r: &mut Report,
    prefix: IpNet,
    facts: &HostFacts,
    bind: &dyn Fn(IpAddr, Proto) -> io::Result<()>,
) {
    let v6 = matches!(prefix, IpNet::V6(_));
    let (ip, local, nonlocal_bind, sysctl) = if v6 {
        (
            "ip -6",
            &facts.local_v6,
            facts.nonlocal_bind_v6,
            "net.ipv6.ip_nonlocal_bind",
        )
    } else {
        (
            "ip",
            &facts.local_v4,
            facts.nonlocal_bind_v4,
            "net.ipv4.ip_nonlocal_bind",
        )
    };

    // Without a local route for the prefix, replies to a drawn address are not delivered to the relay
    // (freebind lets the socket bind, the kernel still drops or forwards the answers).
    match local {
        Ok(routes) if routes.iter().any(|route| route.contains(&prefix)) => r.push(
            Level::Ok,
            format!("{prefix} is routed to this host (local route)"),
            vec![],
        ),
        Ok(_) => r.push(
            Level::Error,
            format!("{prefix} has no local route: replies to its addresses would not reach the relay"),
            vec![
                format!("{ip} route add local {prefix} dev lo"),
                "make it permanent in the network configuration (systemd-networkd: [Route] Type=local Destination=... in lo's .network file)".into(),
            ],
        ),
        Err(e) => r.push(
            Level::Warn,
            format!("could not list local routes ({e}); check that {prefix} is routed locally"),
            vec![format!("{ip} route show table local   # expect a `local {prefix}` line; if missing: {ip} route add local {prefix} dev lo")],
        ),
    }

    let address = match EgressPool::draw_in_prefix(prefix) {
        Ok(a) => a,
        Err(e) => {
            r.push(Level::Error, format!("{prefix}: {e}"), vec![]);
            return;
        }
    };
    for proto in [Proto::Udp, Proto::Tcp] {
        let name = match proto {
            Proto::Udp => "UDP",
            Proto::Tcp => "TCP",
        };
        match bind(address, proto) {
            Ok(()) => r.push(
                Level::Ok,
                format!("{name} socket binds to a random address of {prefix} (freebind)"),
                vec![],
            ),
            Err(e) => {
                let mut fixes = vec![];
                if nonlocal_bind != Some(true) {
                    fixes.push(format!("sysctl -w {sysctl}=1"));
                }
                if v6 {
                    fixes.push("IPV6_FREEBIND needs Linux ≥ 4.15; check `uname -r`".into());
                }
                if e.kind() == io::ErrorKind::PermissionDenied {
                    fixes.push("run without seccomp/LSM restrictions on bind(2)".into());
                }
                r.push(
                    Level::Error,
                    format!("{name} socket cannot bind to a random address of {prefix}: {e}"),
                    fixes,
                );
            }
        }
    }
    if nonlocal_bind == Some(true) {
        r.push(
            Level::Info,
            format!("{sysctl} = 1 (not required: cfr binds with freebind per socket)"),
            vec![],
        );
    }

    // Not verifiable from this host: the upstream network must deliver the prefix here.
    let hint = if v6 {
        vec![
            format!("on the upstream router: ip -6 route add {prefix} via <this host's address on the uplink>"),
            format!("or, if {prefix} is on-link on the uplink (no routed prefix): sysctl -w net.ipv6.conf.<uplink>.proxy_ndp=1 and answer neighbour solicitations for the whole prefix with ndppd (`proxy <uplink> {{ rule {prefix} {{ static }} }}`); `ip -6 neigh add proxy <address> dev <uplink>` works only address by address"),
        ]
    } else {
        vec![
            format!("on the upstream router: ip route add {prefix} via <this host's address on the uplink>"),
            "or, if the prefix is on-link on the uplink: sysctl -w net.ipv4.conf.<uplink>.proxy_arp=1".into(),
        ]
    };
    r.push(
        Level::Info,
        format!("upstream routing for {prefix} cannot be checked from this host: it must deliver the prefix here"),
        hint,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(prefixes: &[&str], fallback: Fallback) -> EgressConfig {
        EgressConfig {
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            fallback,
            ..EgressConfig::default()
        }
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn parses_ip_route_show_table_local() {
        let v4 = "\
local 127.0.0.0/8 dev lo proto kernel scope host src 127.0.0.1
local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1
broadcast 127.255.255.255 dev lo proto kernel scope link src 127.0.0.1
local 198.51.100.0/24 dev lo scope host
";
        assert_eq!(
            parse_ip_local_routes(v4),
            nets(&["127.0.0.0/8", "127.0.0.1/32", "198.51.100.0/24"])
        );
        let v6 = "\
local ::1 dev lo proto kernel metric 0 pref medium
local 2001:db8:cf::/64 dev lo metric 1024 pref medium
anycast fe80:: dev eth0 proto kernel metric 0 pref medium
multicast ff00::/8 dev eth0 proto kernel metric 256 pref medium
";
        assert_eq!(
            parse_ip_local_routes(v6),
            nets(&["::1/128", "2001:db8:cf::/64"])
        );
        assert!(parse_ip_local_routes("").is_empty());
    }

    #[test]
    fn parses_proc_net_ipv6_route_local_entries() {
        let proc = "\
20010db800cf00000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80200001       lo
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
";
        assert_eq!(
            parse_proc_ipv6_route(proc),
            nets(&["2001:db8:cf::/64", "::1/128"])
        );
    }

    fn facts(local_v6: &[&str]) -> HostFacts {
        HostFacts {
            local_v4: Ok(nets(&["127.0.0.0/8"])),
            local_v6: Ok(nets(local_v6)),
            nonlocal_bind_v4: Some(false),
            nonlocal_bind_v6: Some(false),
        }
    }

    #[test]
    fn missing_local_route_is_an_error_with_the_exact_fix() {
        let report = diagnose_with(
            &cfg(&["2001:db8:cf::/64"], Fallback::System),
            &facts(&["::1/128"]),
            &|_, _| Ok(()),
        );
        assert!(!report.ok(), "{report}");
        let text = report.to_string();
        assert!(
            text.contains("fix: ip -6 route add local 2001:db8:cf::/64 dev lo"),
            "{text}"
        );
        assert!(text.contains("ndppd"), "proxy-NDP hint missing: {text}");
        assert!(
            text.contains("IPv4 destinations have no egress prefix"),
            "{text}"
        );
    }

    #[test]
    fn routed_prefix_with_working_bind_passes() {
        let report = diagnose_with(
            &cfg(&["2001:db8:cf::/64", "127.0.0.0/8"], Fallback::System),
            &facts(&["2001:db8::/32"]),
            &|_, _| Ok(()),
        );
        assert!(report.ok(), "{report}");
        assert!(report.to_string().contains("egress check passed"));
    }

    #[test]
    fn failed_bind_is_an_error_suggesting_nonlocal_bind() {
        let report = diagnose_with(
            &cfg(&["2001:db8:cf::/64"], Fallback::Refuse),
            &facts(&["2001:db8:cf::/64"]),
            &|_, _| Err(io::Error::from_raw_os_error(99)),
        );
        assert!(!report.ok());
        let text = report.to_string();
        assert!(
            text.contains("fix: sysctl -w net.ipv6.ip_nonlocal_bind=1"),
            "{text}"
        );
        assert!(text.contains("are refused (fallback = refuse)"), "{text}");
    }

    #[test]
    fn invalid_and_empty_configs_are_reported() {
        let bad = diagnose_with(
            &cfg(&["2001:db8::/48", "2001:db8::/64"], Fallback::System),
            &facts(&[]),
            &|_, _| Ok(()),
        );
        assert!(!bad.ok());
        assert!(bad.to_string().contains("overlap"), "{bad}");
        let empty = diagnose_with(&cfg(&[], Fallback::System), &facts(&[]), &|_, _| Ok(()));
        assert!(empty.ok());
        assert!(empty.to_string().contains("no source privacy"), "{empty}");
    }

    #[test]
    fn diagnose_on_this_host_accepts_loopback_v4() {
        // 127.0.0.0/8 is always routed locally and bindable: a real end-to-end run of the probes.
        let report = diagnose(&cfg(&["127.0.0.0/8"], Fallback::Refuse));
        assert!(report.ok(), "{report}");
    }
}
