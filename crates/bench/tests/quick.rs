//! Smoke test: `--quick` runs every section, and every row carries a number or says why not.
//! No timing is asserted: this box is shared and loopback numbers are noise at these sizes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_fills_every_row_with_a_number_or_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let args = cfr_bench::BenchArgs {
        quick: true,
        json: dir.path().join("bench.json"),
        udp_window: 64,
        ..Default::default()
    };
    let report = tokio::time::timeout(std::time::Duration::from_secs(120), cfr_bench::run(&args))
        .await
        .expect("quick mode finishes within 2 minutes");
    println!("{}", report.table());
    for section in [
        "tcp bulk", "udp", "setup", "scale", "egress", "peer", "fleet",
    ] {
        assert!(
            report.rows.iter().any(|r| r.section == section),
            "expected rows for section {section:?}"
        );
    }
    for r in &report.rows {
        match (r.value, &r.unavailable) {
            (Some(v), None) => assert!(
                v.is_finite(),
                "row {:?} has a non-finite number {v}",
                r.name
            ),
            (None, Some(why)) => assert!(
                !why.is_empty(),
                "row {:?} is unavailable without a reason",
                r.name
            ),
            _ => panic!(
                "row {:?} must have exactly one of a number or a reason",
                r.name
            ),
        }
    }
    // The relay's own rows must be measured, not unavailable: only peer rows may lack a number.
    for name in [
        "h3 CONNECT, 1 tunnel, up",
        "CONNECT-UDP echo: datagrams/s",
        "h3 tunnel setup, warm connection: p99",
    ] {
        let row = report
            .get(name)
            .unwrap_or_else(|| panic!("row {name:?} missing"));
        assert!(
            row.value.is_some(),
            "row {name:?} unavailable: {:?}",
            row.unavailable
        );
    }
}
