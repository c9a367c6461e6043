-- Operators disable sites, gateways and technicians (0 = enabled). A
-- disabled site's or gateway's credential and a disabled technician's
-- sessions are refused.
ALTER TABLE sites ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE gateways ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE technicians ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;

-- Per-site rate limits count a site's recent requests and failure reports;
-- retention deletes old failure reports and audit rows.
CREATE INDEX requests_site_received ON requests(site_id, received_at);
CREATE INDEX failures_site_received ON failures(site_id, received_at);
CREATE INDEX failures_received ON failures(received_at);
CREATE INDEX audit_log_at ON audit_log(at);

-- The audit log stays append-only for 30 days: only rows older than that can
-- be deleted (by the retention of [retention] audit_days, at least 30).
DROP TRIGGER audit_log_no_delete;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
WHEN OLD.at > (CAST(strftime('%s', 'now') AS INTEGER) - 30 * 86400) * 1000
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only (rows younger than 30 days)'); END;
