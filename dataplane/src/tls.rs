//! The TLS side of the fallback carrier: TLS 1.3 configurations (rustls with
//! the ring provider), the agent's verifier of the gateway's pinned key, the
//! WebSocket upgrade over HTTP/1.1 (RFC 6455 §4) and the client of an HTTP
//! CONNECT proxy (RFC 9110 §9.3.6).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The path of the tunnel's WebSocket upgrade.
pub const TUNNEL_PATH: &str = "/v1/stream";
/// The largest request or response head read.
pub const MAX_HEAD: usize = 8192;
/// The header by which the agent says it comes through a proxy (for the
/// gateway's view of the transport).
pub const VIA_PROXY_HEADER: &str = "x-vpnnat-via-proxy";

/// The ring provider (no aws-lc-rs in this tree).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The gateway's TLS configuration: TLS 1.3 only, its one certificate.
///
/// # Errors
/// When the key does not fit the certificate or is of an unsupported kind.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The agent's TLS configuration: TLS 1.3 only, and only the gateway key
/// whose SubjectPublicKeyInfo hashes to `pin`.
///
/// # Errors
/// Only when the provider lacks TLS 1.3 (it does not).
pub fn client_config(pin: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Parses a pin as the messages carry it (64 hex digits).
pub fn parse_pin(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut pin = [0u8; 32];
    for (i, b) in pin.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(pin)
}

/// Lowercase hex of SHA-256 of `bytes` (token hashes, pins).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DER SubjectPublicKeyInfo (RFC 5280 §4.1) of an X.509 certificate,
/// as webpki parses it; `None` when it is not a certificate.
pub fn spki_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    let der = CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    Some(cert.subject_public_key_info().as_ref().to_vec())
}

/// The pin of a certificate: SHA-256 of its SubjectPublicKeyInfo, hex.
pub fn spki_sha256(cert_der: &[u8]) -> Option<String> {
    spki_of(cert_der).map(|spki| sha256_hex(&spki))
}

/// Accepts exactly the gateway key the desired state pinned: the end-entity
/// certificate's SubjectPublicKeyInfo must hash to the pin, and the
/// handshake signature must verify with that key (names, validity dates and
/// issuers do not matter: the pin is the identity).
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let spki = spki_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        if Sha256::digest(&spki)[..] == self.pin[..] {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration offers TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An HTTP/1.1 request or response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The request line or status line.
    pub first: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Parses a head (without the final empty line); `None` when it is not
    /// text or a header line has no colon.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.split("\r\n");
        let first = lines.next()?.to_owned();
        let mut headers = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':')?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        Some(Self { first, headers })
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the comma-separated header `name` lists `token` (any case).
    pub fn lists(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The status code of a response head.
    pub fn status(&self) -> Option<u16> {
        let mut parts = self.first.split(' ');
        let version = parts.next()?;
        if !version.starts_with("HTTP/1.") {
            return None;
        }
        parts.next()?.parse().ok()
    }
}

/// Reads a head up to its empty line. Returns it and the bytes read past it.
///
/// # Errors
/// IO errors, a head longer than [`MAX_HEAD`] or a stream that ends first.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(Head, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Where the search for the empty line resumes: bytes before it were
    // searched already (a head trickled in byte by byte costs O(n)).
    let mut searched = 0;
    loop {
        if let Some(at) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = searched + at;
            let head = Head::parse(&buf[..end])
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP head"))?;
            return Ok((head, buf[end + 4..].to_vec()));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP head too long",
            ));
        }
        searched = buf.len().saturating_sub(3);
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &str) -> String {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut input = Vec::with_capacity(key.len() + GUID.len());
    input.extend_from_slice(key.as_bytes());
    input.extend_from_slice(GUID.as_bytes());
    BASE64.encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &input,
    ))
}

/// The agent's side of the upgrade: sends the request with `token`, checks
/// the `101` answer. Returns bytes read past the answer (the first frames).
///
/// # Errors
/// IO errors, or an answer that is not the upgrade.
pub async fn upgrade_client<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: SocketAddr,
    token: &str,
    via_proxy: bool,
) -> io::Result<Vec<u8>> {
    let key = BASE64.encode(rand::random::<[u8; 16]>());
    let proxy = if via_proxy {
        format!("{VIA_PROXY_HEADER}: 1\r\n")
    } else {
        String::new()
    };
    let request = format!(
        "GET {TUNNEL_PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n{proxy}\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    s.flush().await?;
    let (head, early) = read_head(s).await?;
    let accept = websocket_accept(&key);
    if head.status() != Some(101) || head.header("sec-websocket-accept") != Some(accept.as_str()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the gateway refused the upgrade: {}", head.first),
        ));
    }
    Ok(early)
}

/// What the gateway's TLS port makes of a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A tunnel upgrade: the SHA-256 (hex) of the bearer token presented,
    /// the `Sec-WebSocket-Key`, and whether the agent came through a proxy.
    Upgrade {
        /// SHA-256 of the token, hex.
        token_sha256: String,
        /// The client's key.
        key: String,
        /// Through a proxy.
        via_proxy: bool,
    },
    /// `GET /` or `HEAD /`: the small page.
    Page,
    /// Anything else: 404.
    NotFound,
}

/// Classifies a request head on the gateway's TLS port. Whatever is not a
/// well-formed tunnel upgrade with a bearer token is an ordinary request.
pub fn classify(head: &Head) -> Request {
    let mut parts = head.first.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if (method == "GET" || method == "HEAD") && target == "/" {
        return Request::Page;
    }
    if method != "GET" || target != TUNNEL_PATH {
        return Request::NotFound;
    }
    let token = head
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim);
    match (token, head.header("sec-websocket-key")) {
        (Some(token), Some(key))
            if head.lists("upgrade", "websocket")
                && head.lists("connection", "upgrade")
                && head.header("sec-websocket-version") == Some("13")
                && !token.is_empty() =>
        {
            Request::Upgrade {
                token_sha256: sha256_hex(token.as_bytes()),
                key: key.to_owned(),
                via_proxy: head.header(VIA_PROXY_HEADER).is_some(),
            }
        }
        _ => Request::NotFound,
    }
}

/// The answer to an accepted upgrade.
pub fn upgrade_response(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        websocket_accept(key)
    )
}

/// An ordinary answer: the small page (`head_only` for `HEAD`) or a 404.
pub fn ordinary_response(page: bool, head_only: bool) -> String {
    let (status, body) = if page {
        (
            "200 OK",
            "<!doctype html><html><head><title>Welcome</title></head><body><p>It works.</p></body></html>\n",
        )
    } else {
        (
            "404 Not Found",
            "<!doctype html><html><head><title>404 Not Found</title></head><body><p>Not Found</p></body></html>\n",
        )
    };
    let shown = if head_only { "" } else { body };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{shown}",
        body.len()
    )
}

/// An HTTP CONNECT proxy: `http://[user:pass@]host:port`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or address.
    pub host: String,
    /// Port (required: HTTP proxies have no common default).
    pub port: u16,
    /// `Proxy-Authorization: Basic` credentials (RFC 7617), already encoded.
    basic: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("credentials", &self.basic.is_some())
            .finish()
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

impl Proxy {
    /// Parses `http://[user:pass@]host:port` (the scheme may be left out;
    /// a trailing `/` is allowed). The user and password may be
    /// percent-encoded.
    pub fn parse(url: &str) -> Option<Self> {
        let rest = url.trim();
        let rest = match rest.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return None,
            None => rest,
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once("]:")?;
            (h, p)
        } else {
            hostport.rsplit_once(':')?
        };
        if host.is_empty() || host.contains('/') {
            return None;
        }
        let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
        let basic = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let creds = format!("{}:{}", percent_decode(user)?, percent_decode(pass)?);
                Some(BASE64.encode(creds))
            }
        };
        Some(Self {
            host: host.to_owned(),
            port,
            basic,
        })
    }

    /// The proxy the usual environment names for `target`: `HTTPS_PROXY`,
    /// `https_proxy`, `ALL_PROXY`, `all_proxy` (first set wins), unless
    /// `NO_PROXY`/`no_proxy` exempts the target.
    ///
    /// # Errors
    /// The name of the variable when its value is not a proxy URL we can
    /// use (an `https://` proxy, a missing port): dialling directly instead
    /// would hide the mistake.
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        target: SocketAddr,
    ) -> Result<Option<Self>, &'static str> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let Some((name, url)) = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
            .into_iter()
            .find_map(|n| Some((n, set(n)?)))
        else {
            return Ok(None);
        };
        let no_proxy = set("NO_PROXY").or_else(|| set("no_proxy"));
        if no_proxy.is_some_and(|list| exempt(&list, target)) {
            return Ok(None);
        }
        Self::parse(&url).map(Some).ok_or(name)
    }

    /// Opens a tunnel through the proxy to `target` (RFC 9110 §9.3.6).
    ///
    /// # Errors
    /// IO errors, or a proxy that refuses.
    pub async fn connect(&self, target: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let mut s = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        s.set_nodelay(true)?;
        let auth = self
            .basic
            .as_ref()
            .map(|b| format!("Proxy-Authorization: Basic {b}\r\n"))
            .unwrap_or_default();
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
        s.write_all(request.as_bytes()).await?;
        let (head, early) = read_head(&mut s).await?;
        match head.status() {
            Some(200..=299) if early.is_empty() => Ok(s),
            _ => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the proxy refused: {}", head.first),
            )),
        }
    }
}

/// Whether a `NO_PROXY` list exempts `target`: `*`, the address itself, or
/// (as curl reads it) a domain suffix, which an address never has.
fn exempt(list: &str, target: SocketAddr) -> bool {
    let ip = target.ip().to_string();
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.');
        let (host, port) = match entry.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, p.parse::<u16>().ok()),
            _ => (entry, None),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        entry == "*" || (host == ip && port.is_none_or(|p| p == target.port()))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_rfc_6455_accept_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn upgrade_head(extra: &str) -> Head {
        Head::parse(
            format!(
                "GET {TUNNEL_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                 Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n{extra}"
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn only_a_complete_upgrade_with_a_token_reaches_the_tunnel() {
        let ok = classify(&upgrade_head("Authorization: Bearer s3cret\r\n"));
        assert_eq!(
            ok,
            Request::Upgrade {
                token_sha256: sha256_hex(b"s3cret"),
                key: "abc".into(),
                via_proxy: false,
            }
        );
        assert_eq!(classify(&upgrade_head("")), Request::NotFound);
        assert_eq!(
            classify(&upgrade_head("Authorization: Basic czNjcmV0\r\n")),
            Request::NotFound
        );
        assert_eq!(
            classify(&upgrade_head("Authorization: Bearer \r\n")),
            Request::NotFound
        );
        let page = Head::parse(b"GET / HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!(classify(&page), Request::Page);
        let other = Head::parse(b"GET /admin HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!(classify(&other), Request::NotFound);
        let post = Head::parse(format!("POST {TUNNEL_PATH} HTTP/1.1").as_bytes()).unwrap();
        assert_eq!(classify(&post), Request::NotFound);
        assert!(ordinary_response(false, false).starts_with("HTTP/1.1 404 "));
        assert!(ordinary_response(true, true).ends_with("\r\n\r\n"));
    }

    #[test]
    fn proxy_urls_parse_with_and_without_credentials() {
        let p = Proxy::parse("http://proxy.example:3128/").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.basic),
            ("proxy.example", 3128, None)
        );
        let p = Proxy::parse("http://al%40ice:p%3Ass@10.0.0.1:8080").unwrap();
        assert_eq!(p.host, "10.0.0.1");
        assert_eq!(
            p.basic.as_deref(),
            Some(BASE64.encode("al@ice:p:ss").as_str())
        );
        let p = Proxy::parse("[2001:db8::1]:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("2001:db8::1", 3128));
        assert!(format!("{p:?}").contains("credentials: false"));
        for bad in [
            "socks5://h:1080",
            "http://h",
            "http://:80",
            "http://h:0",
            "http://h:x",
        ] {
            assert_eq!(Proxy::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_environment_names_the_proxy_and_no_proxy_exempts() {
        let target: SocketAddr = "198.51.100.7:443".parse().unwrap();
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(Proxy::from_env(env(&[]), target), Ok(None));
        let p = Proxy::from_env(env(&[("all_proxy", "http://a:1")]), target).unwrap();
        assert_eq!(p.unwrap().host, "a");
        let p = Proxy::from_env(
            env(&[("https_proxy", "http://b:2"), ("ALL_PROXY", "http://a:1")]),
            target,
        )
        .unwrap();
        assert_eq!(p.unwrap().host, "b");
        // An unusable value is an error naming the variable, not "direct".
        assert_eq!(
            Proxy::from_env(env(&[("https_proxy", "https://b:2")]), target),
            Err("https_proxy")
        );
        assert_eq!(
            Proxy::from_env(env(&[("ALL_PROXY", "proxy.example")]), target),
            Err("ALL_PROXY")
        );
        for no in ["*", "example.com, 198.51.100.7", "198.51.100.7:443"] {
            let vars: &'static [(&'static str, &'static str)] = match no {
                "*" => &[("HTTPS_PROXY", "http://b:2"), ("NO_PROXY", "*")],
                "198.51.100.7:443" => &[
                    ("HTTPS_PROXY", "http://b:2"),
                    ("no_proxy", "198.51.100.7:443"),
                ],
                _ => &[
                    ("HTTPS_PROXY", "http://b:2"),
                    ("NO_PROXY", "example.com, 198.51.100.7"),
                ],
            };
            assert_eq!(Proxy::from_env(env(vars), target), Ok(None), "{no}");
        }
        let vars: &'static [(&'static str, &'static str)] = &[
            ("HTTPS_PROXY", "http://b:2"),
            ("NO_PROXY", "198.51.100.8,198.51.100.7:8443"),
        ];
        assert!(Proxy::from_env(env(vars), target).unwrap().is_some());
    }

    #[test]
    fn pins_parse_and_a_truncated_certificate_has_no_spki() {
        let hex = sha256_hex(b"x");
        let pin = parse_pin(&hex).unwrap();
        assert_eq!(pin[..], Sha256::digest(b"x")[..]);
        assert_eq!(parse_pin(&hex[1..]), None);
        assert_eq!(parse_pin(&"zz".repeat(32)), None);
        assert_eq!(spki_of(&[]), None);
        assert_eq!(spki_of(&[0x30, 0x82, 0xff, 0xff, 0x30]), None);
    }

    /// A TLS 1.3 handshake between the two configurations over a pipe.
    async fn handshake(server: Arc<rustls::ServerConfig>, pin: [u8; 32]) -> Result<(), io::Error> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client_config(pin).unwrap());
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let srv = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
        let cli = connector.connect(name, a).await;
        let _ = srv.await;
        cli.map(|s| {
            assert_eq!(
                s.get_ref().1.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            )
        })
    }

    #[tokio::test]
    async fn the_agent_accepts_only_the_pinned_gateway_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gateway.invalid".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        // The pin taken from the certificate is the key's SubjectPublicKeyInfo.
        use rcgen::PublicKeyData as _;
        assert_eq!(spki_of(&der), Some(key.subject_public_key_info()));
        let pin = parse_pin(&spki_sha256(&der).unwrap()).unwrap();
        let server = server_config(
            vec![der],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        handshake(server.clone(), pin).await.unwrap();
        let mut wrong = pin;
        wrong[0] ^= 1;
        let err = handshake(server, wrong).await.unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}
