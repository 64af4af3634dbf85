//! Replays the committed `config_loader` fuzz corpus through the same property the fuzz target
//! checks, on stable Rust, so whatever the fuzzer once found stays fixed.
use std::path::PathBuf;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/config_loader")
}

#[test]
fn config_loader_corpus_replays_clean() {
    let dir = corpus();
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        !entries.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );
    for path in entries {
        let data = std::fs::read(&path).unwrap();
        cfr_relay::config::fuzz_config(&data);
    }
}

#[test]
fn the_full_example_config_in_the_corpus_loads() {
    let text = std::fs::read_to_string(corpus().join("full.toml")).unwrap();
    let cfg = cfr_relay::RelayConfig::from_toml(&text).expect("the example config is valid");
    assert_eq!(cfg.egress.prefixes.len(), 2);
    assert_eq!(cfg.quic_lb.unwrap().server_id.to_string(), "0a0b");
}
