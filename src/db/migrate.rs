//! A small migration runner: the files in `sql/`, applied in order, each in its own
//! transaction, recorded in `rolecache_migrations` with a checksum. Concurrent runners (several
//! instances starting at once) are serialized by an advisory lock; re-running is a no-op.

use tokio_postgres::Client;

/// One versioned migration from `sql/`.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Never edit one that has shipped: add a new one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "users_roles_and_triggers",
        sql: include_str!("../../sql/0001_users_roles_and_triggers.sql"),
    },
    Migration {
        version: 2,
        name: "telegram_update_dedup",
        sql: include_str!("../../sql/0002_telegram_update_dedup.sql"),
    },
    Migration {
        version: 3,
        name: "trust_the_table",
        sql: include_str!("../../sql/0003_trust_the_table.sql"),
    },
];

/// Key of the advisory lock that serializes migration runners ("rolecach" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x726f_6c65_6361_6368;

const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS rolecache_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

const LEDGER_EXISTS: &str = "SELECT to_regclass('rolecache_migrations') IS NOT NULL";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {version} ({name}) was changed after it was applied (checksum {found}, expected {expected})")]
    Modified {
        version: i32,
        name: &'static str,
        found: String,
        expected: String,
    },
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("migration bookkeeping failed: {0}")]
    Ledger(#[from] tokio_postgres::Error),
}

/// Applies every migration not applied yet; returns the versions applied now.
#[tracing::instrument(skip_all)]
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = apply_pending(client).await;
    // Released even when a migration failed; a lost connection releases it too.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply_pending(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    // `CREATE TABLE IF NOT EXISTS` needs CREATE on the schema even when the table exists, which
    // a least-privileged bot role does not have: only create the ledger when it is missing.
    let ledger_exists: bool = client.query_one(LEDGER_EXISTS, &[]).await?.get(0);
    if !ledger_exists {
        client.batch_execute(CREATE_LEDGER).await?;
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        let checksum = checksum(migration.sql);
        let row = client
            .query_opt(
                "SELECT checksum FROM rolecache_migrations WHERE version = $1",
                &[&migration.version],
            )
            .await?;
        if let Some(row) = row {
            let found: String = row.get(0);
            if found != checksum {
                return Err(MigrateError::Modified {
                    version: migration.version,
                    name: migration.name,
                    found,
                    expected: checksum,
                });
            }
            continue;
        }
        let failed = |source| MigrateError::Failed {
            version: migration.version,
            name: migration.name,
            source,
        };
        let tx = client.transaction().await?;
        tx.batch_execute(migration.sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO rolecache_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &checksum],
        )
        .await?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
        applied.push(migration.version);
    }
    Ok(applied)
}

/// FNV-1a (64 bit) of the migration text, in hex: enough to notice an edited migration.
fn checksum(sql: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_strictly_increasing() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
    }

    #[test]
    fn checksum_changes_with_the_text() {
        assert_eq!(checksum("a"), checksum("a"));
        assert_ne!(checksum("a"), checksum("b"));
        assert_eq!(checksum(""), "cbf29ce484222325");
    }
}
