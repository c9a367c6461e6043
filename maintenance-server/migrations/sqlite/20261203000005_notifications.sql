-- When the background task announced that an open request nears its expiry
-- (NULL: not yet). Set once, by the conditional update that also queues the
-- `request.expiring` webhook event, so replicas announce it once.
ALTER TABLE requests ADD COLUMN expiry_warned_at INTEGER;

-- The webhook outbox: one row per event and configured endpoint, written in
-- the transaction that made the event happen (so an event is never lost and
-- never sent for a change that was rolled back), delivered by the
-- background worker with retries, kept after delivery for the operator's
-- view until the retention deletes it.
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint        TEXT    NOT NULL,
    event_id        TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    delivered_at    INTEGER,
    given_up_at     INTEGER,
    last_error      TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
