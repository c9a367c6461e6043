-- Teams of technicians (docs/OPERATIONS.md "Teams"). A site assigned to a
-- team is seen and acted on only by that team's technicians (NULL: by every
-- technician, as before teams). source_prefixes: the team's technician
-- subnets as a JSON array of "a.b.c.d/len"; the gateways let only these
-- reach the NAT addresses of the team's sites.
CREATE TABLE teams (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL UNIQUE,
    source_prefixes TEXT    NOT NULL DEFAULT '[]',
    created_at      INTEGER NOT NULL
);

ALTER TABLE sites ADD COLUMN team_id INTEGER REFERENCES teams (id);
CREATE INDEX sites_team ON sites (team_id);

-- A technician belongs to at most one team (NULL: none; then it sees only
-- the sites without a team). source_prefixes: its own addresses (JSON
-- array, NULL: not set), which replace the team's for the requests it starts.
ALTER TABLE technicians ADD COLUMN team_id INTEGER REFERENCES teams (id);
ALTER TABLE technicians ADD COLUMN source_prefixes TEXT;
