-- rolecache schema, version 3: notifications become hints the listener verifies against the
-- table, and the trigger functions stop depending on the caller's search_path.
--
--   * role_resyncs: one row per statement that asks every instance to flush (a TRUNCATE, or a
--     statement changing more rows than rolecache.bulk_threshold), written by the triggers in
--     the statement's own transaction. A listener flushes on a "truncate" or "resync" payload
--     only if the number of committed rows here changed since it last looked, so a forged or
--     replayed marker costs one count and never a flush. Rows are never updated; deleting old
--     ones is allowed (the count moves, which costs one flush).
--   * Every trigger function runs with search_path = pg_catalog, <this schema>, pg_temp (the
--     temporary schema last): a writer's temporary sequence or table named role_version_seq or
--     role_audit can neither choose the version nor swallow the audit row, and a data-only
--     pg_dump restore (which runs with search_path = '') fires them without error.
--   * An UPDATE's new version is always above the row's old one, even if the sequence was set
--     back (a restore's setval): a cache keeps the highest version it saw per user.
--
-- The payload format is unchanged (see 0001); the listener reads only the user ids from row
-- payloads and re-reads those rows from users.

CREATE TABLE role_resyncs (
    resync_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason      text NOT NULL CHECK (reason IN ('bulk', 'truncate')),
    rows        bigint,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    db_user     text NOT NULL DEFAULT current_user
);

CREATE OR REPLACE FUNCTION rolecache_assign_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.role_version := nextval('role_version_seq');
    ELSE
        IF NEW.role IS DISTINCT FROM OLD.role OR NEW.user_id IS DISTINCT FROM OLD.user_id THEN
            NEW.role_version := greatest(nextval('role_version_seq'), OLD.role_version + 1);
        ELSE
            NEW.role_version := OLD.role_version;
        END IF;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION rolecache_publish(changes rolecache_change[]) RETURNS void
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
        INSERT INTO role_resyncs (reason, rows) VALUES ('bulk', n);
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

CREATE OR REPLACE FUNCTION rolecache_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO role_audit (op, actor_telegram_id)
    VALUES ('truncate', nullif(current_setting('rolecache.actor', true), '')::bigint);
    INSERT INTO role_resyncs (reason) VALUES ('truncate');
    PERFORM pg_notify('role_changes', json_build_object(
        'op', 'truncate', 'ts', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)::text);
    RETURN NULL;
END
$$;

-- The schema is the one this migration runs in, resolved now; pg_temp is listed last so that
-- it is searched last (left out, it would be searched first for tables and sequences).
DO $$
DECLARE
    path text := format('pg_catalog, %I, pg_temp', current_schema());
    fn   text;
BEGIN
    FOREACH fn IN ARRAY ARRAY[
        'rolecache_assign_version()',
        'rolecache_publish(rolecache_change[])',
        'rolecache_on_insert()',
        'rolecache_on_update()',
        'rolecache_on_delete()',
        'rolecache_on_truncate()'
    ] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %s', fn, path);
    END LOOP;
END
$$;

-- Upgrades: roles that could read users (the listener now counts role_resyncs) or write audit
-- rows (the triggers, running as the writer, now also record bulk statements) get the same on
-- role_resyncs, so an instance running as a least-privileged role keeps working.
DO $$
DECLARE
    grantee text;
    target  text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT g.grantee FROM information_schema.role_table_grants g
        WHERE g.table_schema = current_schema() AND g.table_name = 'users'
          AND g.privilege_type = 'SELECT' AND g.grantee <> current_user
    LOOP
        target := CASE WHEN grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(grantee) END;
        EXECUTE format('GRANT SELECT ON role_resyncs TO %s', target);
    END LOOP;
    FOR grantee IN
        SELECT DISTINCT c.grantee FROM information_schema.column_privileges c
        WHERE c.table_schema = current_schema() AND c.table_name = 'role_audit'
          AND c.column_name = 'op' AND c.privilege_type = 'INSERT' AND c.grantee <> current_user
    LOOP
        target := CASE WHEN grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(grantee) END;
        EXECUTE format('GRANT INSERT (reason, rows) ON role_resyncs TO %s', target);
    END LOOP;
END
$$;
