-- rolecache schema, version 2: the Telegram updates recently taken by an instance, so that an
-- update delivered twice (a webhook redelivery after a non-2xx answer or a timeout, possibly to
-- another instance behind the load balancer; or a polling failover re-fetching updates the old
-- leader had not confirmed) is processed once across all instances.
--
--   * The instance that inserts (bot_id, update_id) processes the update; everyone else sees
--     ON CONFLICT DO NOTHING insert no row and drops it.
--   * Rows older than the retention window (Telegram keeps undelivered updates for 24 hours)
--     are deleted periodically by every instance.
--   * bot_id (the part of the token before ':') keeps several bots apart on one database.

CREATE TABLE telegram_updates (
    bot_id      bigint      NOT NULL,
    update_id   bigint      NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bot_id, update_id)
);

CREATE INDEX telegram_updates_received_at ON telegram_updates (received_at);
