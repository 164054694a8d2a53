//! Properties of the payload parser: it is total (never panics, whatever the text) and strict
//! (it accepts exactly the trigger format; one damaged field is an error). The round trip through
//! the real triggers, which needs a database, is in `tests/it/listener/properties.rs`.
//!
//! `PROPTEST_CASES=N` raises the number of cases of every property here (for long runs).

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

use super::{parse, Payload, RowChange, RowOp, MAX_BATCH_CHANGES};
use crate::role::{Role, RoleState};

use crate::proptest_config::config;

/// What a successful parse must satisfy, whatever the input was.
fn well_formed(payload: &Payload) -> Result<(), TestCaseError> {
    if let Payload::Changes { changes, .. } = payload {
        prop_assert!(!changes.is_empty() && changes.len() <= MAX_BATCH_CHANGES);
        for c in changes {
            prop_assert_eq!(c.op == RowOp::Delete, c.state.role.is_none(), "{:?}", c);
        }
    }
    if let Payload::Resync { reason, .. } = payload {
        prop_assert!(reason.chars().count() <= 64);
    }
    Ok(())
}

// ----- the parser alone --------------------------------------------------------------------

const KEYS: [&str; 10] = [
    "op", "user_id", "role", "version", "ts", "changes", "reason", "rows", "pad", "",
];
const WORDS: [&str; 12] = [
    "insert", "update", "delete", "batch", "truncate", "resync", "owner", "admin", "user",
    "banned", "Admin", "root",
];

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(i64::MAX),
            Just(i64::MIN)
        ]
        .prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        proptest::sample::select(WORDS.to_vec()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

/// JSON values shaped like payloads: objects keyed mostly by the payload's own field names,
/// holding the payload's own words, nested a few levels.
fn json_ish() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        4 => proptest::sample::select(KEYS.to_vec()).prop_map(str::to_string),
                        1 => ".{0,6}",
                    ],
                    inner
                ),
                0..7
            )
            .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

fn role() -> impl Strategy<Value = Role> {
    proptest::sample::select(Role::ALL.to_vec())
}

fn row_change() -> impl Strategy<Value = RowChange> {
    (0..3u8, any::<i64>(), role(), any::<i64>()).prop_map(|(op, user_id, role, version)| {
        let (op, state) = match op {
            0 => (RowOp::Insert, RoleState::present(role, version)),
            1 => (RowOp::Update, RoleState::present(role, version)),
            _ => (RowOp::Delete, RoleState::deleted(version)),
        };
        RowChange { op, user_id, state }
    })
}

fn op_name(op: RowOp) -> &'static str {
    match op {
        RowOp::Insert => "insert",
        RowOp::Update => "update",
        RowOp::Delete => "delete",
    }
}

/// A change in the triggers' format (without `ts` inside a batch).
fn change_json(c: &RowChange) -> Value {
    json!({
        "op": op_name(c.op),
        "user_id": c.user_id,
        "role": c.state.role.map(Role::as_str),
        "version": c.state.version,
    })
}

/// The payload the triggers would send for these changes.
fn trigger_payload(changes: &[RowChange], ts: i64) -> Value {
    if let [one] = changes {
        let mut v = change_json(one);
        v["ts"] = json!(ts);
        v
    } else {
        json!({"op": "batch", "ts": ts, "changes": changes.iter().map(change_json).collect::<Vec<_>>()})
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn parse_never_panics_on_arbitrary_text(text in ".{0,300}") {
        if let Ok(p) = parse(&text) {
            well_formed(&p)?;
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(p) = parse(&text) {
            well_formed(&p)?;
        }
    }

    #[test]
    fn parse_never_panics_on_json_shaped_like_payloads(value in json_ish()) {
        if let Ok(p) = parse(&value.to_string()) {
            well_formed(&p)?;
        }
    }

    #[test]
    fn payloads_in_the_trigger_format_parse_to_their_changes(
        changes in prop::collection::vec(row_change(), 1..=64),
        ts in any::<i64>(),
    ) {
        let text = trigger_payload(&changes, ts).to_string();
        prop_assert_eq!(parse(&text), Ok(Payload::Changes { changes, ts_us: ts }));
    }

    /// Strictness: one unknown field, one missing field, a wrong type or an unknown role, and
    /// the payload is refused (the listener resyncs) instead of half-understood.
    #[test]
    fn a_damaged_trigger_payload_is_an_error(
        changes in prop::collection::vec(row_change(), 1..=8),
        damage in 0..5u8,
        pick in any::<prop::sample::Index>(),
        junk in json_leaf(),
    ) {
        let mut value = trigger_payload(&changes, 1);
        let target = if changes.len() == 1 {
            &mut value
        } else {
            let rows = value["changes"].as_array_mut().unwrap();
            let i = pick.index(rows.len());
            &mut rows[i]
        };
        let fields = ["op", "user_id", "role", "version"];
        let field = fields[pick.index(fields.len())];
        let object = target.as_object_mut().unwrap();
        match damage {
            0 => { object.insert("extra".into(), junk); }
            1 => { object.remove(field); }
            2 => { object.insert("role".into(), json!("superuser")); }
            3 => { object.insert("user_id".into(), json!(format!("{}", changes[0].user_id))); }
            _ => { object.insert("op".into(), json!("upsert")); }
        }
        prop_assert!(parse(&value.to_string()).is_err(), "accepted {}", value);
    }

    /// A valid payload cut anywhere, or with one byte changed, never panics; cut short it is an
    /// error.
    #[test]
    fn a_mangled_trigger_payload_never_panics(
        changes in prop::collection::vec(row_change(), 1..=16),
        cut in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let text = trigger_payload(&changes, 7).to_string();
        let at = cut.index(text.len());
        prop_assert!(parse(&text[..at]).is_err());
        let mut bytes = text.into_bytes();
        bytes[at] = byte;
        if let Ok(p) = parse(&String::from_utf8_lossy(&bytes)) {
            well_formed(&p)?;
        }
    }
}
