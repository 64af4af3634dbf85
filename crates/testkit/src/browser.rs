//! Real local clients as child processes — Debian curl and headless Chromium (with a private NSS
//! certificate database) — each bounded in time, its whole process group killed on overrun. The
//! tools come from interop/setup.sh; a missing tool is an error, never a skip.
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// The HTTPS origin listens on 127.0.0.5 and only the relay maps `localhost` there: a client that
/// resolved `localhost` itself or bypassed the proxy would find nothing listening on 127.0.0.1, so
/// a successful fetch proves the name went through the proxy to the relay (socks5h semantics).
pub const ORIGIN_IP: &str = "127.0.0.5";

/// Where to bind an origin on [`ORIGIN_IP`] (any free port).
pub fn origin_bind() -> SocketAddr {
    SocketAddr::new(ORIGIN_IP.parse().unwrap(), 0)
}

/// For a relay's resolver: `localhost` (what curl and Chromium send) → [`ORIGIN_IP`].
pub fn resolve_localhost_to_origin_ip(cfg: &mut cfr_relay::config::RelayConfig) {
    cfg.resolver
        .hosts
        .insert("localhost".into(), vec![ORIGIN_IP.parse().unwrap()]);
}

const CURL: &str = "/usr/bin/curl";
const CHROMIUM: &str = "/usr/bin/chromium";
const CERTUTIL: &str = "/usr/bin/certutil";

/// Runs `cmd` (in its own process group) for at most `limit`; on overrun the whole group is
/// killed. Returns (exit ok, stdout, stderr), or Err when it cannot start or overruns.
pub async fn run_group(
    mut cmd: Command,
    limit: Duration,
) -> Result<(bool, String, String), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e} (interop/setup.sh installs it)"))?;
    let pgid = child.id().expect("just spawned");
    let _group = GroupGuard(pgid);
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let io = async {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let _ = tokio::join!(stdout.read_to_end(&mut o), stderr.read_to_end(&mut e));
        let status = child.wait().await;
        (status, o, e)
    };
    match tokio::time::timeout(limit, io).await {
        Ok((status, o, e)) => Ok((
            status.map(|s| s.success()).unwrap_or(false),
            String::from_utf8_lossy(&o).into_owned(),
            String::from_utf8_lossy(&e).into_owned(),
        )),
        Err(_) => Err(format!(
            "{cmd:?} did not finish within {limit:?}; process group killed"
        )),
    }
}

/// Kills a process group on drop (children such as Chromium's renderers included).
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

/// `/usr/bin/curl -sS --max-time 20 ARGS`, bounded at 30 s. Returns (exit ok, stdout, stderr);
/// panics when curl cannot run or overruns.
pub async fn curl(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(CURL);
    cmd.args(["-sS", "--max-time", "20"]).args(args);
    run_group(cmd, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Loads `url` in headless Chromium through `proxy_server` (e.g. `socks5://127.0.0.1:1080` or
/// `https://localhost:443`; loopback destinations are proxied too) and returns its `--dump-dom`.
///
/// Chromium runs with a fresh temporary HOME whose NSS database (what Chromium on Linux trusts)
/// holds exactly `trusted_cas` (nickname, PEM file), a fresh profile, the standard headless flags
/// and then `extra_args`. Ok only when Chromium exits successfully within `limit` and the DOM
/// contains `expect`; otherwise Err with the exit status, the tail of Chromium's stderr and the
/// DOM. The process group is killed on overrun.
pub async fn chromium_dump_dom(
    proxy_server: &str,
    extra_args: &[&str],
    trusted_cas: &[(&str, &Path)],
    url: &str,
    expect: &str,
    limit: Duration,
) -> Result<String, String> {
    for tool in [CHROMIUM, CERTUTIL] {
        if !Path::new(tool).exists() {
            return Err(format!(
                "{tool} is missing: run interop/setup.sh (installs chromium and libnss3-tools)"
            ));
        }
    }
    let home = tempfile::tempdir().map_err(|e| format!("temporary HOME: {e}"))?;
    let nssdb = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).map_err(|e| format!("{}: {e}", nssdb.display()))?;
    let db = format!("sql:{}", nssdb.display());
    let mut certutil_runs = vec![vec!["-d", &db, "-N", "--empty-password"]];
    let pems: Vec<String> = trusted_cas
        .iter()
        .map(|(_, pem)| pem.display().to_string())
        .collect();
    for ((name, _), pem) in trusted_cas.iter().zip(&pems) {
        certutil_runs.push(vec!["-d", &db, "-A", "-n", name, "-t", "C,,", "-i", pem]);
    }
    for args in certutil_runs {
        let mut cmd = Command::new(CERTUTIL);
        cmd.args(&args).env("HOME", home.path());
        let (ok, _, err) = run_group(cmd, Duration::from_secs(20)).await?;
        if !ok {
            return Err(format!("certutil {args:?}: {err}"));
        }
    }

    let mut cmd = Command::new(CHROMIUM);
    cmd.env("HOME", home.path())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-dev-shm-usage",
            // Chromium never proxies loopback unless told to: the test origins are on loopback.
            "--proxy-bypass-list=<-loopback>",
        ])
        .arg(format!(
            "--user-data-dir={}",
            home.path().join("profile").display()
        ))
        // With a SOCKS5 proxy Chromium sends host names to the proxy (socks5h semantics).
        .arg(format!("--proxy-server={proxy_server}"))
        .args(extra_args)
        .args(["--dump-dom", url]);
    let (ok, dom, err) = run_group(cmd, limit).await?;
    if ok && dom.contains(expect) {
        return Ok(dom);
    }
    let lines: Vec<&str> = err.lines().collect();
    Err(format!(
        "Chromium --dump-dom {url} via {proxy_server} must exit ok and contain {expect:?}; \
         exit ok={ok}\nDOM:\n{dom}\nchromium stderr (tail):\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n")
    ))
}
