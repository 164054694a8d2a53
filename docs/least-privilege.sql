-- A least-privileged database role for the bot (and `rolecache watch`).
--
-- Run as the owner of the schema (the role that ran `rolecache migrate`; a superuser works too),
-- connected to the bot's database, after the migrations:
--
--   psql -v bot_role=bot -v bot_database=bot -d bot -f docs/least-privilege.sql
--
-- Then give the role a password (`\password bot` in psql) and put it in the bot's DATABASE_URL,
-- in its environment, never in the repository. Migrations keep running as the owner: the bot
-- role cannot change the schema, so run `rolecache migrate` as the owner before each upgrade.
-- tests/it/schema/security.rs runs this file and checks what the role can and cannot do.

CREATE ROLE :"bot_role" LOGIN;

-- Anyone who can connect can send NOTIFY role_changes and LISTEN to it. Instances treat a
-- notification only as a hint to re-read rows (a forged one changes no role), but anyone who can
-- LISTEN sees every role change as it happens, and forged notifications still cost reads: only
-- the bot (and the DBAs, who connect as roles of their own) may connect. No temporary objects:
-- the trigger functions ignore them, but nothing needs them.
REVOKE CONNECT, TEMPORARY ON DATABASE :"bot_database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"bot_database" TO :"bot_role";

-- No new objects in public (already the default since PostgreSQL 15).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"bot_role";

-- Lookups, /audit, and the migration check at start (which only reads the ledger once every
-- migration is applied).
GRANT SELECT ON users, role_audit, rolecache_migrations TO :"bot_role";
-- The listener counts the flushes the triggers recorded, to verify truncate and bulk markers.
GRANT SELECT ON role_resyncs TO :"bot_role";
-- Registration on first contact and username updates; role changes by /promote and /demote.
-- Not role_version (the trigger sets it), not user_id updates, no DELETE, no TRUNCATE.
GRANT INSERT (user_id, username) ON users TO :"bot_role";
GRANT UPDATE (username, role) ON users TO :"bot_role";
-- The triggers run as the user who changed the row: they draw the version and write the audit
-- row. Column grants keep db_user, application_name and changed_at at their defaults, so the
-- bot cannot write audit rows in someone else's name.
GRANT USAGE ON SEQUENCE role_version_seq TO :"bot_role";
GRANT INSERT (op, user_id, old_role, new_role, role_version, actor_telegram_id)
    ON role_audit TO :"bot_role";
-- Likewise the record of a bulk statement (one changing more rows than the bulk threshold).
GRANT INSERT (reason, rows) ON role_resyncs TO :"bot_role";
