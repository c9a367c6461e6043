-- A site's tunnel is announced to its agent only once its gateway has applied
-- a desired state that contains the site's peer (the patent's "server polls
-- the gateway until the tunnel is up"): an agent that dialled first would
-- have its handshake dropped and wait WireGuard's 5 s REKEY_TIMEOUT.
-- ready_version: the gateway document version that first holds the peer;
-- -1 until that version is published (set at commit); 0 for tunnels that
-- existed before this migration (already dialled, no need to wait).
ALTER TABLE tunnels ADD COLUMN ready_version INTEGER NOT NULL DEFAULT 0;
