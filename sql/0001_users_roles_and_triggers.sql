-- rolecache schema, version 1: the users table, the role version sequence, the audit table and
-- the triggers that publish every committed role change on the `role_changes` channel.
--
-- Contract (see README "Schema contract"):
--   * users.role is one of owner/admin/user/banned; anything else is rejected.
--   * users.role_version comes from role_version_seq, assigned by a BEFORE row trigger that runs
--     after the row lock is taken, so per row versions grow in commit order. It cannot be edited
--     by hand.
--   * Every statement that changes roles sends JSON on `role_changes` (delivered at COMMIT):
--       one row     {"op":"insert|update|delete","user_id":..,"role":..|null,"version":..,"ts":..}
--       many rows   {"op":"batch","ts":..,"changes":[{"op":..,"user_id":..,"role":..,"version":..},..]}
--                   in chunks of at most 64 changes (each payload well under 8000 bytes)
--       above the bulk threshold (setting rolecache.bulk_threshold, default 10000 rows)
--                   {"op":"resync","reason":"bulk","rows":N,"ts":..}
--       TRUNCATE    {"op":"truncate","ts":..}
--     "ts" is microseconds since the Unix epoch when the statement's trigger ran.
--   * Updates that do not change a role (username, same role) send nothing.
--   * Every role change writes one row to role_audit, tagged with the database user, the
--     application_name and, when set, the transaction-local setting rolecache.actor (the acting
--     Telegram user id).
--   * All triggers are ENABLE ALWAYS: they fire in session_replication_role = replica sessions
--     (pg_restore, replication tools) too.

CREATE SEQUENCE role_version_seq AS bigint;

CREATE TABLE users (
    user_id      bigint PRIMARY KEY,
    username     text,
    role         text NOT NULL DEFAULT 'user'
                 CONSTRAINT users_role_valid CHECK (role IN ('owner', 'admin', 'user', 'banned')),
    -- Set by the rolecache_version trigger; no default, so an insert with that trigger disabled
    -- fails instead of publishing an unversioned row.
    role_version bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE role_version_seq OWNED BY users.role_version;
CREATE INDEX users_username_lower ON users (lower(username));

CREATE TABLE role_audit (
    audit_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    op                text NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'truncate')),
    user_id           bigint,
    old_role          text,
    new_role          text,
    role_version      bigint,
    changed_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    db_user           text NOT NULL DEFAULT current_user,
    application_name  text DEFAULT current_setting('application_name', true),
    actor_telegram_id bigint
);
CREATE INDEX role_audit_user ON role_audit (user_id, audit_id);

-- One changed row, as the statement triggers collect them.
CREATE TYPE rolecache_change AS (
    op       text,
    user_id  bigint,
    old_role text,
    new_role text,
    version  bigint
);

-- BEFORE row trigger: a fresh version for every insert and every role (or key) change; the
-- version is not editable by hand.
CREATE FUNCTION rolecache_assign_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.role_version := nextval('role_version_seq');
    ELSE
        IF NEW.role IS DISTINCT FROM OLD.role OR NEW.user_id IS DISTINCT FROM OLD.user_id THEN
            NEW.role_version := nextval('role_version_seq');
        ELSE
            NEW.role_version := OLD.role_version;
        END IF;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

-- Audit and publish the changes of one statement.
CREATE FUNCTION rolecache_publish(changes rolecache_change[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    n         integer := coalesce(cardinality(changes), 0);
    ts        bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    threshold integer := coalesce(nullif(current_setting('rolecache.bulk_threshold', true), '')::integer, 10000);
    actor     bigint := nullif(current_setting('rolecache.actor', true), '')::bigint;
    payload   text;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;

    INSERT INTO role_audit (op, user_id, old_role, new_role, role_version, actor_telegram_id)
    SELECT c.op, c.user_id, c.old_role, c.new_role, c.version, actor
    FROM unnest(changes) AS c;

    IF n > threshold THEN
        PERFORM pg_notify('role_changes', json_build_object(
            'op', 'resync', 'reason', 'bulk', 'rows', n, 'ts', ts)::text);
    ELSIF n = 1 THEN
        PERFORM pg_notify('role_changes', json_build_object(
            'op', c.op, 'user_id', c.user_id, 'role', c.new_role, 'version', c.version, 'ts', ts)::text)
        FROM unnest(changes) AS c;
    ELSE
        FOR payload IN
            SELECT json_build_object('op', 'batch', 'ts', ts, 'changes', json_agg(
                       json_build_object('op', c.op, 'user_id', c.user_id, 'role', c.new_role,
                                         'version', c.version) ORDER BY c.ord))::text
            FROM unnest(changes) WITH ORDINALITY AS c(op, user_id, old_role, new_role, version, ord)
            GROUP BY (c.ord - 1) / 64
            ORDER BY (c.ord - 1) / 64
        LOOP
            PERFORM pg_notify('role_changes', payload);
        END LOOP;
    END IF;
END
$$;

CREATE FUNCTION rolecache_on_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rolecache_publish(ARRAY(
        SELECT ROW('insert', n.user_id, NULL, n.role, n.role_version)::rolecache_change
        FROM new_rows AS n));
    RETURN NULL;
END
$$;

-- Updates: pair old and new rows by key. A key change shows up as a delete and an insert; rows
-- whose role did not change are skipped, so username updates send nothing.
CREATE FUNCTION rolecache_on_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rolecache_publish(ARRAY(
        SELECT CASE
                   WHEN o.user_id IS NULL
                       THEN ROW('insert', n.user_id, NULL, n.role, n.role_version)::rolecache_change
                   WHEN n.user_id IS NULL
                       THEN ROW('delete', o.user_id, o.role, NULL, o.role_version)::rolecache_change
                   ELSE ROW('update', n.user_id, o.role, n.role, n.role_version)::rolecache_change
               END
        FROM new_rows AS n
        FULL JOIN old_rows AS o ON o.user_id = n.user_id
        WHERE o.user_id IS NULL OR n.user_id IS NULL OR o.role IS DISTINCT FROM n.role));
    RETURN NULL;
END
$$;

-- A deletion carries the deleted row's version: the cache orders a tombstone after the live
-- row of the same version, and any re-insert draws a newer one.
CREATE FUNCTION rolecache_on_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rolecache_publish(ARRAY(
        SELECT ROW('delete', o.user_id, o.role, NULL, o.role_version)::rolecache_change
        FROM old_rows AS o));
    RETURN NULL;
END
$$;

CREATE FUNCTION rolecache_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO role_audit (op, actor_telegram_id)
    VALUES ('truncate', nullif(current_setting('rolecache.actor', true), '')::bigint);
    PERFORM pg_notify('role_changes', json_build_object(
        'op', 'truncate', 'ts', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER rolecache_version
    BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION rolecache_assign_version();
CREATE TRIGGER rolecache_notify_insert
    AFTER INSERT ON users REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rolecache_on_insert();
CREATE TRIGGER rolecache_notify_update
    AFTER UPDATE ON users REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rolecache_on_update();
CREATE TRIGGER rolecache_notify_delete
    AFTER DELETE ON users REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rolecache_on_delete();
CREATE TRIGGER rolecache_notify_truncate
    AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION rolecache_on_truncate();

ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_version;
ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_insert;
ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_update;
ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_delete;
ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_truncate;
