-- A site without a router agent (agentless = 1): its router is a standard
-- WireGuard device configured from files the server renders. It never
-- enrolls; its public_key is set at creation, and router_private_key holds
-- the router's private key (standard base64) when the server generated the
-- pair, so that the rendered files are complete (NULL when the operator
-- gave the router's own public key).
ALTER TABLE sites ADD COLUMN agentless INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sites ADD COLUMN router_private_key TEXT;

-- The real LAN address of a terminal of a request for a site without an
-- agent (the number form of nat_address): with no agent to keep it, the
-- server needs it to render the router's 1:1 NAT rules. NULL for every
-- site with an agent, whose real addresses the server never learns.
ALTER TABLE request_terminals ADD COLUMN lan_address INTEGER;
