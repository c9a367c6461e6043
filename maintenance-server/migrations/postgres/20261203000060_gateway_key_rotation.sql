-- Rotation of a gateway's own WireGuard key (docs/DESIGN.md, "Control plane").
-- rotate_key: the operator or the schedule asked for a new key (a flag of
-- the gateway's desired state, cleared once its next key is recorded).
-- next_public_key: the next key the gateway announced and already answers
-- beside public_key; agents are told to dial it.
-- key_since: when the current key was first seen (the schedule's age).
ALTER TABLE gateways ADD COLUMN next_public_key TEXT;
ALTER TABLE gateways ADD COLUMN rotate_key BIGINT NOT NULL DEFAULT 0;
ALTER TABLE gateways ADD COLUMN key_since BIGINT;
-- Existing keys count from this upgrade, not from the gateways' creation:
-- otherwise the schedule would rotate every older gateway at once, some of
-- them perhaps not upgraded yet to follow it.
UPDATE gateways SET key_since = CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT) WHERE public_key IS NOT NULL;
