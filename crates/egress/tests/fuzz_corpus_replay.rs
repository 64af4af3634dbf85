//! Replays the committed `seal_key_file` fuzz corpus through the property the fuzz target checks,
//! on stable Rust, so whatever the fuzzer once found stays fixed.
use std::path::PathBuf;

#[test]
fn seal_key_file_corpus_replays_clean() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/seal_key_file");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let outcome = std::panic::catch_unwind(|| cfr_egress::seal::fuzz_key_file(&data));
        assert!(
            outcome.is_ok(),
            "seal_key_file property violated by {}",
            path.display()
        );
    }
    // The seeds cover every kind that parses.
    let kinds: Vec<&str> = files
        .iter()
        .filter_map(|p| cfr_egress::seal::KeyFile::parse(&std::fs::read(p).unwrap()).ok())
        .map(|f| f.kind())
        .collect();
    for kind in ["master", "relay", "share"] {
        assert!(kinds.contains(&kind), "no seed parses as a {kind} key file");
    }
}
