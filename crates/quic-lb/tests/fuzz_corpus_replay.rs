//! Replays every committed seed of this crate's fuzz targets (`fuzz/corpus/<target>/*`) through
//! the property checks the targets run, so what the fuzzer once found stays fixed on stable Rust.
use std::path::PathBuf;

#[test]
fn quic_lb_fuzz_corpora_replay_clean() {
    for (target, check) in cfr_quic_lb::fuzzing::TARGETS {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
        for seed in seeds {
            let data = std::fs::read(&seed).unwrap();
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                panic!(
                    "fuzz target {target} violated a property on {}",
                    seed.display()
                );
            }
        }
    }
}
