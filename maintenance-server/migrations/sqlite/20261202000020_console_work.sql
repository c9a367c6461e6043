-- A failure report a technician has seen and taken on: when and by whom
-- (NULL: not yet). The console lists the others as still to look at.
ALTER TABLE failures ADD COLUMN acknowledged_at INTEGER;
ALTER TABLE failures ADD COLUMN acknowledged_by TEXT;

-- The technician who started a request (their login name; NULL until
-- started), shown on the customer's page as who is working.
ALTER TABLE requests ADD COLUMN started_by TEXT;
