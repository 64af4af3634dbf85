//! A `cfr` child process (a relay, a fleet member) that is killed when dropped: started with
//! `--print-ready`, it counts as up once its ready line arrives. Shared by the fleet bench and the
//! CLI tests of crates/cfr.
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running child process, killed (and reaped) on drop if it is still running.
pub struct CfrProcess {
    child: Child,
    /// The file its stderr goes to, if kept.
    log: Option<PathBuf>,
}

impl CfrProcess {
    /// Spawns `cmd` (stdin closed, stdout piped, stderr to the file `log` or discarded) and waits
    /// at most `limit` for its first stdout line, which must be a `--print-ready` line
    /// (`{"ready":true,…}`); returns the process and that line. Later output is drained so the
    /// child never blocks on a full pipe. On failure the child is killed and the error carries
    /// its log.
    pub fn spawn_ready(
        mut cmd: Command,
        log: Option<&Path>,
        limit: Duration,
    ) -> Result<(CfrProcess, String), String> {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            None => Stdio::null(),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {cmd:?}: {e}"))?;
        let mut process = CfrProcess {
            child,
            log: log.map(Path::to_owned),
        };
        let stdout = process.child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            for _ in lines.map_while(Result::ok) {}
        });
        match rx.recv_timeout(limit) {
            Ok(Some(line)) if line.contains("\"ready\":true") => Ok((process, line)),
            Ok(Some(line)) => Err(format!(
                "{cmd:?}: not a ready line: {line}\n{}",
                process.log()
            )),
            Ok(None) => Err(format!(
                "{cmd:?} exited before it was ready:\n{}",
                process.log()
            )),
            Err(_) => Err(format!(
                "{cmd:?} printed no ready line within {limit:?}:\n{}",
                process.log()
            )),
        }
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stderr so far (empty if stderr was discarded).
    pub fn log(&self) -> String {
        self.log
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits at most `limit` for it to exit; the error carries its log.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "process {} did not exit within {limit:?}:\n{}",
                    self.id(),
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for CfrProcess {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
