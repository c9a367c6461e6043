-- A site's tunnel kind ('wireguard' or 'ipsec'). An IPsec site has a
-- pre-shared key (standard base64 of 32 random bytes): the server hands it
-- to the site's agent and gateway in their desired states, so unlike the
-- bearer credentials it is kept, not hashed.
ALTER TABLE sites ADD COLUMN tunnel TEXT NOT NULL DEFAULT 'wireguard';
ALTER TABLE sites ADD COLUMN ipsec_psk TEXT;

-- The technician prefixes a gateway registered (a JSON list): the center's
-- traffic selectors of its IPsec sites.
ALTER TABLE gateways ADD COLUMN technician_prefixes TEXT NOT NULL DEFAULT '[]';
