-- vpnnat maintenance-server schema (SQLite). Times are Unix milliseconds.
-- The server never stores a customer's real LAN addresses: terminals are names.

CREATE TABLE sites (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL UNIQUE,
    public_key      TEXT    UNIQUE,
    credential_hash TEXT    UNIQUE,
    version         INTEGER NOT NULL DEFAULT 1,
    problem         TEXT,
    applied_version INTEGER NOT NULL DEFAULT 0,
    applied_errors  TEXT    NOT NULL DEFAULT '[]',
    created_at      INTEGER NOT NULL,
    enrolled_at     INTEGER
);

CREATE TABLE enrollment_tokens (
    token_hash TEXT    PRIMARY KEY,
    site_id    INTEGER NOT NULL REFERENCES sites(id),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
);
CREATE INDEX enrollment_tokens_site ON enrollment_tokens(site_id);

CREATE TABLE gateways (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL UNIQUE,
    credential_hash  TEXT    NOT NULL UNIQUE,
    endpoints        TEXT    NOT NULL DEFAULT '[]',
    public_key       TEXT,
    tunnel_kinds     TEXT    NOT NULL DEFAULT '[]',
    max_tunnels      INTEGER NOT NULL DEFAULT 0,
    tunnels          INTEGER NOT NULL DEFAULT 0,
    active_tunnels   INTEGER NOT NULL DEFAULT 0,
    health           TEXT    NOT NULL DEFAULT 'down',
    drain            INTEGER NOT NULL DEFAULT 0,
    version          INTEGER NOT NULL DEFAULT 1,
    applied_version  INTEGER NOT NULL DEFAULT 0,
    applied_errors   TEXT    NOT NULL DEFAULT '[]',
    software_version TEXT    NOT NULL DEFAULT '',
    last_heartbeat   INTEGER,
    created_at       INTEGER NOT NULL
);

-- The patent's gateway-tunnel table: a site's tunnel slot on a gateway.
CREATE TABLE tunnels (
    site_id    INTEGER PRIMARY KEY REFERENCES sites(id),
    gateway_id INTEGER NOT NULL REFERENCES gateways(id),
    created_at INTEGER NOT NULL
);
CREATE INDEX tunnels_gateway ON tunnels(gateway_id);

-- The VPN-NAT table: every pool address, free (site_id NULL) or held by a
-- site's terminal. Pre-populated from [pool] prefix; the primary key makes a
-- double hand-out impossible.
CREATE TABLE nat_addresses (
    address      INTEGER PRIMARY KEY,
    site_id      INTEGER REFERENCES sites(id),
    terminal     TEXT,
    allocated_at INTEGER,
    released_at  INTEGER NOT NULL DEFAULT 0,
    UNIQUE (site_id, terminal)
);
CREATE INDEX nat_addresses_free ON nat_addresses(released_at, address) WHERE site_id IS NULL;

CREATE TABLE failures (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id     INTEGER NOT NULL REFERENCES sites(id),
    code        TEXT    NOT NULL,
    detail      TEXT    NOT NULL,
    terminal    TEXT,
    received_at INTEGER NOT NULL,
    request_id  INTEGER
);
CREATE INDEX failures_site ON failures(site_id);

CREATE TABLE requests (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id        INTEGER NOT NULL REFERENCES sites(id),
    global_address TEXT,
    requester_name TEXT    NOT NULL,
    level          TEXT    NOT NULL,
    urgency        TEXT    NOT NULL,
    phone          TEXT    NOT NULL,
    content        TEXT    NOT NULL,
    state          TEXT    NOT NULL,
    gateway_id     INTEGER,
    received_at    INTEGER NOT NULL,
    started_at     INTEGER,
    ended_at       INTEGER,
    expires_at     INTEGER NOT NULL,
    failure_id     INTEGER
);
CREATE INDEX requests_state ON requests(state, expires_at);
CREATE INDEX requests_site ON requests(site_id, id);

CREATE TABLE request_terminals (
    request_id  INTEGER NOT NULL REFERENCES requests(id),
    position    INTEGER NOT NULL,
    terminal    TEXT    NOT NULL,
    nat_address INTEGER,
    PRIMARY KEY (request_id, position)
);

CREATE TABLE technicians (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL
);

CREATE TABLE technician_sessions (
    token_hash    TEXT    PRIMARY KEY,
    technician_id INTEGER NOT NULL REFERENCES technicians(id),
    csrf_hash     TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL
);

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    actor  TEXT    NOT NULL,
    action TEXT    NOT NULL,
    object TEXT    NOT NULL,
    detail TEXT    NOT NULL
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

-- Versions of documents that are not one row: the console feed.
CREATE TABLE counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('console', 1);
