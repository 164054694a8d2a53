//! The check that the triggers which feed the cache exist and fire in every session.

use tokio_postgres::Client;

/// The triggers on `users` that the cache depends on; all must be `ENABLE ALWAYS`.
pub const REQUIRED_TRIGGERS: [&str; 5] = [
    "rolecache_version",
    "rolecache_notify_insert",
    "rolecache_notify_update",
    "rolecache_notify_delete",
    "rolecache_notify_truncate",
];

/// The function every statement trigger calls (replacing it changes what is announced).
const PUBLISH_FUNCTION: &str = "rolecache_publish(rolecache_change[])";

/// Per trigger: its name, enabled flag and oid, the `xmin` of its `pg_trigger` row (a DISABLE
/// and ENABLE, even in one transaction, leave flag and oid as they were but rewrite the row) and
/// its function's oid and `xmin` (`CREATE OR REPLACE FUNCTION` rewrites that row). Per table:
/// the oid, the publish function's `xmin` and whether `role_resyncs` can be read (NULL: missing).
const TRIGGER_STATE: &str =
    "SELECT c.oid::bigint, t.tgname::text, t.tgenabled::text, t.oid::bigint,
            t.xmin::text::bigint, p.oid::bigint, p.xmin::text::bigint,
            (SELECT pub.xmin::text::bigint FROM pg_proc pub
              WHERE pub.oid = to_regprocedure($1)),
            has_table_privilege(to_regclass('role_resyncs')::oid, 'SELECT')
     FROM pg_class c
     LEFT JOIN pg_trigger t ON t.tgrelid = c.oid AND NOT t.tgisinternal
     LEFT JOIN pg_proc p ON p.oid = t.tgfoid
     WHERE c.oid = to_regclass('users')";

/// What the check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TriggerCheck {
    /// All triggers present and `ENABLE ALWAYS`. The fingerprint (oids and catalog `xmin`s of
    /// the table, the triggers and their functions) changes when any of them is dropped and
    /// recreated, switched off and on, or replaced.
    Ready { fingerprint: Vec<i64> },
    /// The cache cannot be trusted: the reason says what is wrong and how to fix it.
    Broken { reason: String },
}

/// Reads `pg_trigger` for the `users` table (outside any transaction).
pub async fn check(client: &Client) -> Result<TriggerCheck, tokio_postgres::Error> {
    let rows = client.query(TRIGGER_STATE, &[&PUBLISH_FUNCTION]).await?;
    let Some(first) = rows.first() else {
        return Ok(TriggerCheck::Broken {
            reason: "table users does not exist (run `rolecache migrate`)".into(),
        });
    };
    let mut fingerprint = vec![
        first.try_get::<_, i64>(0)?,
        first.try_get::<_, Option<i64>>(7)?.unwrap_or(0),
    ];
    let mut problems = Vec::new();
    if first.try_get::<_, Option<i64>>(7)?.is_none() {
        problems.push(format!(
            "function {PUBLISH_FUNCTION} is missing (run `rolecache migrate`)"
        ));
    }
    match first.try_get::<_, Option<bool>>(8)? {
        None => problems.push("table role_resyncs is missing (run `rolecache migrate`)".into()),
        Some(false) => problems.push(
            "this role cannot read role_resyncs (GRANT SELECT ON role_resyncs TO it; see docs/least-privilege.sql)"
                .into(),
        ),
        Some(true) => {}
    }
    for name in REQUIRED_TRIGGERS {
        let row = rows
            .iter()
            .find(|r| r.try_get::<_, Option<&str>>(1).ok().flatten() == Some(name));
        match row {
            None => problems.push(format!("trigger {name} is missing")),
            Some(row) => {
                let enabled: String = row.try_get(2)?;
                fingerprint.push(row.try_get(3)?);
                fingerprint.push(row.try_get(4)?);
                fingerprint.push(row.try_get(5)?);
                fingerprint.push(row.try_get(6)?);
                if enabled != "A" {
                    problems.push(format!(
                        "trigger {name} is {} (run: ALTER TABLE users ENABLE ALWAYS TRIGGER {name})",
                        describe(&enabled)
                    ));
                }
            }
        }
    }
    Ok(if problems.is_empty() {
        TriggerCheck::Ready { fingerprint }
    } else {
        TriggerCheck::Broken {
            reason: problems.join("; "),
        }
    })
}

fn describe(tgenabled: &str) -> &'static str {
    match tgenabled {
        "D" => "disabled",
        "O" => "enabled only for origin sessions (skipped by pg_restore and replication)",
        "R" => "enabled only for replica sessions",
        _ => "in an unknown state",
    }
}
