//! Parsing of `role_changes` payloads: pure, total (never panics), and strict: anything that is
//! not exactly what the triggers in `sql/` send is an error, and the listener answers an error
//! with a resync.

use serde::Deserialize;

use crate::role::{Role, RoleState, RoleVersion, UserId};
pub use crate::role::{RowChange, RowOp};

/// PostgreSQL rejects NOTIFY payloads of 8000 bytes or more; anything longer did not come from
/// a server we understand.
pub const MAX_PAYLOAD_BYTES: usize = 8000;

/// Most changes one batch payload may carry (the triggers send at most 64).
pub const MAX_BATCH_CHANGES: usize = 256;

/// What one notification on `role_changes` means.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// Row changes of one statement, in order; `ts_us` is when its trigger ran (µs since epoch).
    Changes { changes: Vec<RowChange>, ts_us: i64 },
    /// The table was truncated: every cached role is void.
    Truncate { ts_us: i64 },
    /// Too many rows changed for row payloads: every cached role is void.
    Resync {
        reason: String,
        rows: i64,
        ts_us: i64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("payload is not valid: {0}")]
    Invalid(String),
    #[error("{0}")]
    UnknownRole(#[from] crate::role::UnknownRole),
    #[error("a {op} change must carry {expected}")]
    RoleMismatch {
        op: &'static str,
        expected: &'static str,
    },
    #[error("batch of {0} changes is empty or larger than {MAX_BATCH_CHANGES}")]
    BatchSize(usize),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    op: String,
    user_id: i64,
    // Required even when null: serde would otherwise read a missing `role` as `None`, and the
    // triggers always send it.
    #[serde(deserialize_with = "Option::deserialize")]
    role: Option<String>,
    version: i64,
    #[serde(default)]
    ts: Option<i64>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum RawPayload {
    Insert(RawRowBody),
    Update(RawRowBody),
    Delete(RawRowBody),
    Batch { ts: i64, changes: Vec<RawRow> },
    Truncate { ts: i64 },
    Resync { reason: String, rows: i64, ts: i64 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRowBody {
    user_id: i64,
    #[serde(deserialize_with = "Option::deserialize")]
    role: Option<String>,
    version: i64,
    ts: i64,
}

/// Parses one payload. Never panics, whatever the input.
pub fn parse(payload: &str) -> Result<Payload, PayloadError> {
    if payload.len() >= MAX_PAYLOAD_BYTES {
        return Err(PayloadError::TooLarge(payload.len()));
    }
    let raw: RawPayload =
        serde_json::from_str(payload).map_err(|e| PayloadError::Invalid(e.to_string()))?;
    Ok(match raw {
        RawPayload::Insert(b) => single("insert", b)?,
        RawPayload::Update(b) => single("update", b)?,
        RawPayload::Delete(b) => single("delete", b)?,
        RawPayload::Batch { ts, changes } => {
            if changes.is_empty() || changes.len() > MAX_BATCH_CHANGES {
                return Err(PayloadError::BatchSize(changes.len()));
            }
            let changes = changes
                .into_iter()
                .map(|r| {
                    if r.ts.is_some() {
                        return Err(PayloadError::Invalid("ts inside a batch row".into()));
                    }
                    row_change(&r.op, r.user_id, r.role, r.version)
                })
                .collect::<Result<_, _>>()?;
            Payload::Changes { changes, ts_us: ts }
        }
        RawPayload::Truncate { ts } => Payload::Truncate { ts_us: ts },
        RawPayload::Resync { reason, rows, ts } => Payload::Resync {
            reason: reason.chars().take(64).collect(),
            rows,
            ts_us: ts,
        },
    })
}

fn single(op: &str, b: RawRowBody) -> Result<Payload, PayloadError> {
    Ok(Payload::Changes {
        changes: vec![row_change(op, b.user_id, b.role, b.version)?],
        ts_us: b.ts,
    })
}

fn row_change(
    op: &str,
    user_id: UserId,
    role: Option<String>,
    version: RoleVersion,
) -> Result<RowChange, PayloadError> {
    let op = match op {
        "insert" => RowOp::Insert,
        "update" => RowOp::Update,
        "delete" => RowOp::Delete,
        other => {
            return Err(PayloadError::Invalid(format!(
                "unknown row op {:?}",
                other.chars().take(32).collect::<String>()
            )))
        }
    };
    let role = role.map(|r| r.parse::<Role>()).transpose()?;
    let state = match (op, role) {
        (RowOp::Delete, None) => RoleState::deleted(version),
        (RowOp::Delete, Some(_)) => {
            return Err(PayloadError::RoleMismatch {
                op: "delete",
                expected: "a null role",
            })
        }
        (_, Some(role)) => RoleState::present(role, version),
        (RowOp::Insert, None) | (RowOp::Update, None) => {
            return Err(PayloadError::RoleMismatch {
                op: "insert or update",
                expected: "a role",
            })
        }
    };
    Ok(RowChange { op, user_id, state })
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_update_as_the_trigger_sends_it() {
        let p = parse(r#"{"op" : "update", "user_id" : 42, "role" : "admin", "version" : 17, "ts" : 1700000000000000}"#).unwrap();
        assert_eq!(
            p,
            Payload::Changes {
                changes: vec![RowChange {
                    op: RowOp::Update,
                    user_id: 42,
                    state: RoleState::present(Role::Admin, 17)
                }],
                ts_us: 1_700_000_000_000_000
            }
        );
    }

    #[test]
    fn delete_carries_a_tombstone() {
        let p = parse(r#"{"op":"delete","user_id":7,"role":null,"version":9,"ts":1}"#).unwrap();
        let Payload::Changes { changes, .. } = p else {
            panic!("not a change: {p:?}")
        };
        assert_eq!(changes[0].state, RoleState::deleted(9));
    }

    #[test]
    fn batch_keeps_order() {
        let p = parse(r#"{"op":"batch","ts":5,"changes":[{"op":"insert","user_id":1,"role":"user","version":3},{"op":"delete","user_id":2,"role":null,"version":1}]}"#).unwrap();
        let Payload::Changes { changes, ts_us } = p else {
            panic!("not a change")
        };
        assert_eq!(ts_us, 5);
        assert_eq!(
            changes.iter().map(|c| c.user_id).collect::<Vec<_>>(),
            [1, 2]
        );
    }

    #[test]
    fn truncate_and_resync_markers() {
        assert_eq!(
            parse(r#"{"op":"truncate","ts":3}"#).unwrap(),
            Payload::Truncate { ts_us: 3 }
        );
        assert!(matches!(
            parse(r#"{"op":"resync","reason":"bulk","rows":20000,"ts":3}"#).unwrap(),
            Payload::Resync { rows: 20000, .. }
        ));
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let bad = [
            "",
            "not json",
            "{}",
            "[]",
            "null",
            r#"{"op":"update"}"#,
            r#"{"op":"update","user_id":"42","role":"admin","version":1,"ts":1}"#,
            r#"{"op":"update","user_id":42,"role":"root","version":1,"ts":1}"#,
            r#"{"op":"update","user_id":42,"role":null,"version":1,"ts":1}"#,
            r#"{"op":"delete","user_id":42,"role":"user","version":1,"ts":1}"#,
            r#"{"op":"update","user_id":42,"role":"admin","version":1.5,"ts":1}"#,
            r#"{"op":"update","user_id":1e30,"role":"admin","version":1,"ts":1}"#,
            r#"{"op":"update","user_id":42,"role":"admin","version":1,"ts":1,"x":1}"#,
            r#"{"op":"drop","ts":1}"#,
            r#"{"op":"batch","ts":1,"changes":[]}"#,
            r#"{"op":"batch","ts":1,"changes":[{"op":"batch","user_id":1,"role":"user","version":1}]}"#,
        ];
        for payload in bad {
            assert!(parse(payload).is_err(), "accepted {payload:?}");
        }
    }

    #[test]
    fn a_change_without_its_role_field_is_an_error() {
        for payload in [
            r#"{"op":"delete","user_id":7,"version":9,"ts":1}"#,
            r#"{"op":"batch","ts":1,"changes":[{"op":"delete","user_id":7,"version":9}]}"#,
        ] {
            assert!(parse(payload).is_err(), "accepted {payload}");
        }
    }

    #[test]
    fn oversized_payload_is_rejected_before_parsing() {
        let huge = format!(r#"{{"op":"truncate","ts":1,"pad":"{}"}}"#, "x".repeat(9000));
        assert_eq!(parse(&huge), Err(PayloadError::TooLarge(huge.len())));
    }
}
