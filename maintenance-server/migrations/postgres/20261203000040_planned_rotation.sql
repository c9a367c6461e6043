-- Planned rotation of a site's WireGuard key and credential
-- (docs/OPERATIONS.md, "Rotating keys and credentials").
-- next_public_key: the key the agent registered, accepted by the site's
-- gateway next to public_key until the agent says it uses it;
-- next_key_gateway/next_key_version: the gateway document that first held it
-- (the agent switches once that gateway applied it).
ALTER TABLE sites ADD COLUMN next_public_key TEXT;
ALTER TABLE sites ADD COLUMN next_key_gateway BIGINT;
ALTER TABLE sites ADD COLUMN next_key_version BIGINT;
-- Flags of the agent's desired state: the operator asked, or the schedule.
ALTER TABLE sites ADD COLUMN rotate_key BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sites ADD COLUMN rotate_credential BIGINT NOT NULL DEFAULT 0;
-- When the key and credential last changed (NULL: at enrollment).
ALTER TABLE sites ADD COLUMN key_rotated_at BIGINT;
ALTER TABLE sites ADD COLUMN credential_rotated_at BIGINT;
-- The credential before a planned rotation: valid until the new one is
-- first used or until previous_credential_until.
ALTER TABLE sites ADD COLUMN previous_credential_hash TEXT;
ALTER TABLE sites ADD COLUMN previous_credential_until BIGINT;
