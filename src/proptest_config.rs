//! The configuration the crate's property tests share (unit tests only).

use proptest::test_runner::Config as ProptestConfig;

/// Cases per property: the default unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub(crate) fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        // The same cap as the property tests that run on a database, where shrinking is slow; a
        // failure prints the seed and the case anyway.
        max_shrink_iters: 256,
        // Failures print their minimal case; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}
