-- The TLS fallback: what a gateway registered for it (JSON of GatewayTls,
-- NULL: none), and how each site's tunnel travels as its gateway last
-- reported ('udp', 'tls', 'tls_proxy'; NULL: not known).
ALTER TABLE gateways ADD COLUMN tls TEXT;
ALTER TABLE tunnels ADD COLUMN transport TEXT;
