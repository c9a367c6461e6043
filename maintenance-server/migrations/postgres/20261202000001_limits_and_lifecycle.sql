-- Operators disable sites, gateways and technicians (0 = enabled). A
-- disabled site's or gateway's credential and a disabled technician's
-- sessions are refused.
ALTER TABLE sites ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE gateways ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE technicians ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;

-- Per-site rate limits count a site's recent requests and failure reports;
-- retention deletes old failure reports and audit rows.
CREATE INDEX requests_site_received ON requests(site_id, received_at);
CREATE INDEX failures_site_received ON failures(site_id, received_at);
CREATE INDEX failures_received ON failures(received_at);
CREATE INDEX audit_log_at ON audit_log(at);

-- The audit log stays append-only for 30 days: only rows older than that can
-- be deleted (by the retention of [retention] audit_days, at least 30).
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.at < (EXTRACT(EPOCH FROM now()) - 30 * 86400) * 1000 THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the audit log is append-only (rows younger than 30 days)';
END;
$$;
