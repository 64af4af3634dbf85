//! Network namespaces for tests that need addresses the host does not have (IPv6 egress prefixes).
//!
//! A test calls [`run_in_netns`]: the parent creates a fresh namespace (`ip netns add`), applies
//! the setup commands (`ip -n NS ...`), and re-executes the current test binary inside it with an
//! environment marker; the child runs the test body. The namespace is deleted by a drop guard. A
//! test that cannot create the namespace FAILS (it needs root and iproute2, as in CI) — it never
//! skips.
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

const CHILD_ENV: &str = "CFR_TESTKIT_NETNS_CHILD";
const CHILD_DONE: &str = "cfr-testkit netns child: body finished";

/// A network namespace deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn create() -> NetNs {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "cfr-t-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("could not run `ip` (iproute2 is required for netns tests)");
        assert!(
            out.status.success(),
            "could not create network namespace {name} (netns tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n NS <args>`, panicking with its stderr on failure.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`ip -n {} {}` failed: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// True inside the re-executed child.
pub fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Parent side: creates a namespace, runs each `setup` as `ip -n NS ...`, re-executes test
/// `test_name` of this binary inside it and asserts the child ran the body and passed.
/// Child side: runs `body` on a fresh multi-thread runtime and prints the completion marker.
pub fn run_in_netns<F, Fut>(test_name: &str, setup: &[&[&str]], body: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if in_child() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body());
        println!("{CHILD_DONE}");
        return;
    }
    let ns = NetNs::create();
    for args in setup {
        ns.ip(args);
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- child stdout ---\n{stdout}--- child stderr ---\n{stderr}");
    assert!(
        out.status.success(),
        "the test body inside namespace {} failed",
        ns.name
    );
    // A filter that matched nothing would "pass" with zero tests.
    assert!(
        stdout.contains(CHILD_DONE),
        "the child did not run the test body {test_name}"
    );
}
