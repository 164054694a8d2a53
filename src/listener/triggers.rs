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

const TRIGGER_STATE: &str = "SELECT c.oid::bigint, t.tgname::text, t.tgenabled::text, t.oid::bigint
     FROM pg_class c
     LEFT JOIN pg_trigger t ON t.tgrelid = c.oid AND NOT t.tgisinternal
     WHERE c.oid = to_regclass('users')";

/// What the check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TriggerCheck {
    /// All triggers present and `ENABLE ALWAYS`. The fingerprint (table and trigger oids)
    /// changes when the table or a trigger is dropped and recreated.
    Ready { fingerprint: Vec<i64> },
    /// The cache cannot be trusted: the reason says what is wrong and how to fix it.
    Broken { reason: String },
}

/// Reads `pg_trigger` for the `users` table (outside any transaction).
pub async fn check(client: &Client) -> Result<TriggerCheck, tokio_postgres::Error> {
    let rows = client.query(TRIGGER_STATE, &[]).await?;
    let Some(first) = rows.first() else {
        return Ok(TriggerCheck::Broken {
            reason: "table users does not exist (run `rolecache migrate`)".into(),
        });
    };
    let mut fingerprint = vec![first.try_get::<_, i64>(0)?];
    let mut problems = Vec::new();
    for name in REQUIRED_TRIGGERS {
        let row = rows
            .iter()
            .find(|r| r.try_get::<_, Option<&str>>(1).ok().flatten() == Some(name));
        match row {
            None => problems.push(format!("trigger {name} is missing")),
            Some(row) => {
                let enabled: String = row.try_get(2)?;
                fingerprint.push(row.try_get(3)?);
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
