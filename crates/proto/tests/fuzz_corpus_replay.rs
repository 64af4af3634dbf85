//! Replays every committed fuzz seed (`fuzz/corpus/<target>/*`) through the property checks the
//! fuzz targets run, so corpus regressions fail on stable `cargo test`.
use std::path::PathBuf;

use cfr_proto::fuzzing::TARGETS;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

#[test]
fn fuzz_corpus_replays_through_property_checks() {
    let mut total = 0;
    for (target, check) in TARGETS {
        let dir = corpus_dir(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()));
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.expect("readable corpus entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "corpus directory {} has no seeds; every fuzz target needs some",
            dir.display()
        );
        for file in &files {
            let data = std::fs::read(file).expect("readable corpus file");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "fuzz target {target} violated a property on seed {}",
                file.display()
            );
        }
        total += files.len();
    }
    assert!(total > 0);
}
