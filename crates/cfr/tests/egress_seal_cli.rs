//! `cfr egress keygen / derive / open` as an operator runs them: offline, from key files, with the
//! addresses a sealing relay would issue (sealed here through the same library the relay uses).
use std::net::Ipv6Addr;
use std::path::Path;
use std::process::{Command, Output};

use cfr_egress::seal::{read_key_file, unix_now, KeyFile, SealLayout, Sealer, Subscriber};

fn cfr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cfr"))
        .args(args)
        .output()
        .expect("cfr runs")
}

/// `cfr egress open --key KEY --at AT [extra…] ADDRESS`.
fn open_with_key(key: &str, at: &str, extra: &[&str], address: &str) -> Output {
    let mut args = vec!["egress", "open", "--key", key, "--at", at];
    args.extend_from_slice(extra);
    args.push(address);
    cfr(&args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const PREFIX: &str = "2001:db8:cf::/64";

/// The address a relay holding `key` (master or relay key) seals for `handle` now.
fn sealed_address(key: &Path, handle: u32, instance: u32) -> Ipv6Addr {
    let file = read_key_file(key).unwrap();
    let chain = match &file {
        KeyFile::Master { key, .. } => key.chain_at(0),
        KeyFile::Relay { chain, .. } => chain.clone(),
        KeyFile::Share { .. } => panic!("a share cannot seal"),
    };
    let now = unix_now();
    let sealer = Sealer::new(*file.params(), chain, instance, 0, now).unwrap();
    let layout = SealLayout::for_prefix(PREFIX.parse().unwrap(), file.params()).unwrap();
    let iid = sealer.seal(&layout, Subscriber(handle), now);
    let net: u128 = u128::from("2001:db8:cf::".parse::<Ipv6Addr>().unwrap());
    Ipv6Addr::from(net | iid)
}

fn now_rfc3339() -> String {
    let o = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

#[test]
fn master_key_opens_its_addresses_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    let k = key.to_str().unwrap();
    let out = cfr(&["egress", "keygen", "--out", k]);
    assert!(out.status.success(), "keygen: {}", stderr(&out));
    let file = std::fs::read_to_string(&key).unwrap();
    let key_hex = file
        .lines()
        .find_map(|l| l.strip_prefix("key = \""))
        .expect("a key line")
        .trim_end_matches('"');
    assert_eq!(key_hex.len(), 64);
    assert!(
        !stdout(&out).contains(key_hex) && !stderr(&out).contains(key_hex),
        "keygen must not print the key"
    );
    let again = cfr(&["egress", "keygen", "--out", k]);
    assert!(
        !again.status.success(),
        "keygen must never overwrite a key file"
    );

    let at = now_rfc3339();
    let addr = sealed_address(&key, 77, 2).to_string();
    let out = open_with_key(k, &at, &["--instances", "3"], &addr);
    assert!(
        out.status.success(),
        "open: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.contains("subscriber 77 ") && text.contains("instance 2"),
        "expected subscriber 77 on instance 2: {text}"
    );

    let anon = sealed_address(&key, 0, 0).to_string();
    let out = open_with_key(k, &at, &[], &anon);
    assert!(
        stdout(&out).contains("subscriber anonymous"),
        "{}",
        stdout(&out)
    );

    // An address of the prefix that was never sealed.
    let out = open_with_key(k, &at, &[], "2001:db8:cf::1234");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("no match"), "{}", stdout(&out));

    // A key file others can read is refused, with the fix.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = open_with_key(k, &at, &[], &addr);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
}

#[test]
fn two_of_three_shares_open_what_the_relay_key_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let relay_key = dir.path().join("relay.key");
    let r = relay_key.to_str().unwrap();
    let out = cfr(&["egress", "keygen", "--out", r, "--shares", "2/3"]);
    assert!(out.status.success(), "keygen --shares: {}", stderr(&out));
    assert!(matches!(
        read_key_file(&relay_key).unwrap(),
        KeyFile::Relay { .. }
    ));
    let share = |i: u32| format!("{r}.share-{i}");
    let at = now_rfc3339();
    let addr = sealed_address(&relay_key, 4242, 0).to_string();
    for (a, b) in [(1, 2), (2, 3), (1, 3)] {
        let out = cfr(&[
            "egress",
            "open",
            "--share",
            &share(a),
            "--share",
            &share(b),
            "--at",
            &at,
            &addr,
        ]);
        assert!(
            stdout(&out).contains("subscriber 4242 "),
            "shares {a}+{b}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    let out = cfr(&["egress", "open", "--share", &share(1), "--at", &at, &addr]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("2 needed"), "{}", stderr(&out));
    // The relay key itself opens its own epoch.
    let out = open_with_key(r, &at, &[], &addr);
    assert!(
        stdout(&out).contains("subscriber 4242 "),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_derived_relay_key_seals_what_the_master_opens() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master.key");
    let relay = dir.path().join("relay.key");
    let (m, r) = (master.to_str().unwrap(), relay.to_str().unwrap());
    assert!(cfr(&["egress", "keygen", "--out", m]).status.success());
    let out = cfr(&["egress", "derive", "--key", m, "--out", r]);
    assert!(out.status.success(), "derive: {}", stderr(&out));
    let addr = sealed_address(&relay, 9, 0).to_string();
    let out = open_with_key(m, &now_rfc3339(), &[], &addr);
    assert!(stdout(&out).contains("subscriber 9 "), "{}", stdout(&out));
}
