//! Fuzzes the `role_changes` payload parser: it must never panic, and whatever it accepts must
//! be well formed (a bounded, non-empty batch; a role exactly when the row is not deleted).
//!
//! `cargo +nightly fuzz run payload` from the repository root (see docs/fuzzing.md).

#![no_main]

use libfuzzer_sys::fuzz_target;
use rolecache::listener::payload::{parse, Payload, RowOp, MAX_BATCH_CHANGES, MAX_PAYLOAD_BYTES};

fuzz_target!(|data: &[u8]| {
    // Notification payloads arrive as text; tokio-postgres hands them over as &str.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Ok(Payload::Changes { changes, .. }) => {
            assert!(text.len() < MAX_PAYLOAD_BYTES);
            assert!(!changes.is_empty() && changes.len() <= MAX_BATCH_CHANGES);
            for change in changes {
                assert_eq!(change.op == RowOp::Delete, change.state.role.is_none());
            }
        }
        Ok(Payload::Resync { reason, .. }) => assert!(reason.chars().count() <= 64),
        Ok(Payload::Truncate { .. }) | Err(_) => {}
    }
});
