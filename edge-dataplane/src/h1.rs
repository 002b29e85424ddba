//! HTTP/1.1 message heads and bodies for the proxy's fast path.
//!
//! Pure byte work, no I/O: parse a request or response head (httparse),
//! decide how its body is framed (RFC 9112 §6), write the head that is
//! forwarded (hop-by-hop fields removed, `x-forwarded-for` appended,
//! `x-sextant-origin` added), and find where a chunked body ends while it
//! passes through unchanged. What the fast path does not handle itself
//! (HTTP/1.0, chunked request bodies, `Expect`, `CONNECT`, absolute-form
//! targets, repeated `Content-Length`) is reported as [`Parsed::HandOff`]
//! so that the connection goes on in hyper from that request. A WebSocket
//! handshake (RFC 6455) keeps its `Upgrade`, and an origin's `101` to it is
//! passed on for the caller to tunnel; any other upgrade is removed.

use std::io::Write;

/// Largest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 100;

/// Most fields one `Connection` header may name: real clients name one or
/// two, and each named field is compared with every header.
pub const MAX_CONNECTION_OPTIONS: usize = 16;

/// Fields that belong to one connection and are never forwarded
/// (RFC 9110 §7.6.1; `Trailer` is end-to-end since RFC 9110 §6.6.2).
const HOP_BY_HOP: [&[u8]; 8] = [
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"transfer-encoding",
    b"upgrade",
];

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding, passed through as is.
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

/// Why a head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed head: {0}")]
    Parse(httparse::Error),
    #[error("head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("invalid content-length {0:?}")]
    BadLength(String),
    #[error("conflicting content-length fields")]
    ConflictingLength,
    #[error("unsupported transfer-encoding {0:?} (only chunked is forwarded)")]
    BadTransferEncoding(String),
    #[error("unexpected 101 switching protocols (no upgrade was asked for)")]
    UnexpectedUpgrade,
    #[error("101 switching protocols without upgrade: websocket and this handshake's accept key")]
    BadUpgrade,
    #[error("status {0} is outside 100..=599")]
    BadStatus(u16),
    #[error("an HTTP/1.1 request needs exactly one host field, found {0}")]
    HostCount(usize),
    #[error("invalid host {0:?}")]
    BadHost(String),
    #[error("connection names more than {MAX_CONNECTION_OPTIONS} fields")]
    TooManyConnectionOptions,
}

impl HeadError {
    /// The status a client gets for a request head refused with this.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge | Self::TooManyHeaders => 431,
            _ => 400,
        }
    }

    fn from_httparse(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => Self::TooManyHeaders,
            e => Self::Parse(e),
        }
    }
}

/// The outcome of looking at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The head is not complete yet: read more.
    Partial,
    /// The head is complete.
    Done(T),
    /// A request the fast path leaves to hyper.
    HandOff,
}

/// A request head the fast path forwards.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, final CRLF included.
    pub len: usize,
    /// Its body: [`Framing::None`] or [`Framing::Length`].
    pub body: Framing,
    /// A HEAD request (its response has no body).
    pub head_method: bool,
    /// An idempotent method (RFC 9110 §9.2.2): sent again on a new
    /// connection when a pooled one dies before answering.
    pub idempotent: bool,
    /// The client keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// A WebSocket handshake (RFC 6455 §4.1: a GET without a body whose
    /// `Connection` names `upgrade`, whose `Upgrade` lists `websocket`, with
    /// one 16-byte `Sec-WebSocket-Key` and version 13) goes out with
    /// `upgrade: websocket`, and the origin may switch: this is the
    /// `Sec-WebSocket-Accept` its 101 must carry.
    pub upgrade: Option<WebSocketAccept>,
}

/// A response head, seen from the proxy.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the head, final CRLF included.
    pub len: usize,
    pub status: u16,
    /// An interim (1xx) response other than a 101: pass it on (RFC 9110
    /// §15.2) and read the next head.
    pub interim: bool,
    pub body: Framing,
    /// The origin keeps the connection open after this response.
    pub reusable: bool,
    /// A `101` to a WebSocket handshake, with its accept key: after this
    /// head, the client and the origin talk through a tunnel.
    pub upgraded: bool,
    /// The client connection ends after this final response (it was
    /// written with `connection: close`).
    pub close: bool,
}

/// A `Sec-WebSocket-Accept` value (base64 of a SHA-1).
pub type WebSocketAccept = [u8; 28];

/// The `Sec-WebSocket-Accept` that answers `key` (RFC 6455 §4.2.2), which
/// only a server that read this handshake can give.
pub fn websocket_accept(key: &[u8]) -> WebSocketAccept {
    use base64::Engine as _;
    use sha1::Digest as _;
    let digest = sha1::Sha1::new()
        .chain_update(key)
        .chain_update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
        .finalize();
    let mut out = [0u8; 28];
    // 20 bytes are always 28 base64 characters.
    let _ = base64::engine::general_purpose::STANDARD.encode_slice(digest, &mut out);
    out
}

/// The accept key a WebSocket handshake expects, if these fields make one
/// (one `Sec-WebSocket-Key` of 16 bytes in base64, version 13).
fn websocket_key(headers: &[httparse::Header<'_>]) -> Option<WebSocketAccept> {
    use base64::Engine as _;
    let one = |name: &[u8]| {
        let mut v = headers.iter().filter(|h| is(h.name, name));
        match (v.next(), v.next()) {
            (Some(h), None) => Some(h.value.trim_ascii()),
            _ => None,
        }
    };
    if one(b"sec-websocket-version")? != b"13" {
        return None;
    }
    let key = one(b"sec-websocket-key")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(key).ok()?;
    (decoded.len() == 16).then(|| websocket_accept(key))
}

/// What a response answers, as far as reading it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Asked {
    /// A HEAD request (its response has no body).
    pub head_method: bool,
    /// The client keeps its connection open after this exchange.
    pub keep_alive: bool,
    /// A WebSocket handshake: a `101` with this accept key may answer it.
    pub upgrade: Option<WebSocketAccept>,
}

impl RequestHead {
    /// What the response to this request answers.
    pub fn asked(&self) -> Asked {
        Asked {
            head_method: self.head_method,
            keep_alive: self.keep_alive,
            upgrade: self.upgrade,
        }
    }
}

fn is(name: &str, lower: &[u8]) -> bool {
    name.as_bytes().eq_ignore_ascii_case(lower)
}

/// Comma-separated tokens of a field value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// The fields named by `Connection` (hop-by-hop too), and whether it said
/// `close` / `keep-alive`.
struct ConnectionField<'a> {
    named: Vec<&'a [u8]>,
    close: bool,
    keep_alive: bool,
}

fn connection_field<'a>(
    headers: &[httparse::Header<'a>],
) -> Result<ConnectionField<'a>, HeadError> {
    let mut c = ConnectionField {
        named: Vec::new(),
        close: false,
        keep_alive: false,
    };
    for h in headers.iter().filter(|h| is(h.name, b"connection")) {
        for t in tokens(h.value).filter(|t| !t.is_empty()) {
            if t.eq_ignore_ascii_case(b"close") {
                c.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                c.keep_alive = true;
            } else if c.named.len() == MAX_CONNECTION_OPTIONS {
                return Err(HeadError::TooManyConnectionOptions);
            } else {
                c.named.push(t);
            }
        }
    }
    Ok(c)
}

/// A `Host` value (RFC 9110 §7.2, RFC 3986 §3.2.2): `host [":" port]`
/// with no userinfo, path or whitespace; empty is allowed (a target
/// without authority). The host is a name (letters, digits, `-._~`, the
/// sub-delimiters, `%XX`), or an IP literal in brackets: an IPv6 address,
/// with a zone id after `%25` (RFC 6874) or not, or a `v` future form.
pub fn valid_host(v: &[u8]) -> bool {
    let (host_ok, port) = match v.strip_prefix(b"[") {
        Some(rest) => match rest.iter().position(|&b| b == b']') {
            Some(end) => {
                let port = match &rest[end + 1..] {
                    [] => None,
                    [b':', port @ ..] => Some(port),
                    _ => return false,
                };
                (ip_literal(&rest[..end]), port)
            }
            None => return false,
        },
        None => {
            let (host, port) = match v.iter().rposition(|&b| b == b':') {
                Some(i) => (&v[..i], Some(&v[i + 1..])),
                None => (v, None),
            };
            (reg_name(host), port)
        }
    };
    host_ok
        // Digits only: u16's parser would also take a sign.
        && port.is_none_or(|p| {
            p.is_empty()
                || (p.iter().all(u8::is_ascii_digit)
                    && std::str::from_utf8(p).is_ok_and(|p| p.parse::<u16>().is_ok()))
        })
}

/// A reg-name: unreserved, sub-delims and `%XX` escapes; but no comma,
/// which no DNS name has and which lets `a,b` read as a list of hosts.
fn reg_name(h: &[u8]) -> bool {
    let mut i = 0;
    while i < h.len() {
        match h[i] {
            b'%' => {
                if !(i + 2 < h.len()
                    && h[i + 1].is_ascii_hexdigit()
                    && h[i + 2].is_ascii_hexdigit())
                {
                    return false;
                }
                i += 3;
            }
            b if b != b',' && unreserved_or_sub(b) => i += 1,
            _ => return false,
        }
    }
    true
}

/// What is inside the brackets of an IP literal.
fn ip_literal(inner: &[u8]) -> bool {
    if let Some(future) = inner
        .strip_prefix(b"v")
        .or_else(|| inner.strip_prefix(b"V"))
    {
        // "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
        return match future.iter().position(|&b| b == b'.') {
            Some(dot) => {
                dot > 0
                    && future[..dot].iter().all(u8::is_ascii_hexdigit)
                    && dot + 1 < future.len()
                    && future[dot + 1..]
                        .iter()
                        .all(|&b| unreserved_or_sub(b) || b == b':')
            }
            None => false,
        };
    }
    let (addr, zone) = match inner.windows(3).position(|w| w == b"%25") {
        Some(i) => (&inner[..i], Some(&inner[i + 3..])),
        None => (inner, None),
    };
    std::str::from_utf8(addr)
        .ok()
        .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
        .is_some()
        && zone.is_none_or(|z| !z.is_empty() && reg_name(z))
}

/// RFC 3986 unreserved and sub-delims characters.
fn unreserved_or_sub(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)
}

fn hop_by_hop(name: &str, conn: &ConnectionField<'_>) -> bool {
    HOP_BY_HOP.iter().any(|h| is(name, h)) || conn.named.iter().any(|n| is(name, n))
}

fn parse_length(value: &[u8]) -> Result<u64, HeadError> {
    let v = value.trim_ascii();
    let bad = || HeadError::BadLength(String::from_utf8_lossy(value).into_owned());
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    v.iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or_else(bad)
}

/// Writes `name: N`, the number without an intermediate string.
fn put_number(out: &mut Vec<u8>, name: &[u8], n: u64) {
    out.extend_from_slice(name);
    let _ = write!(out, ": {n}\r\n");
}

fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Parses the request head at the start of `buf`. When the fast path
/// forwards it, the head to send upstream (origin-form, HTTP/1.1,
/// hop-by-hop fields removed, the client's address appended to
/// `x-forwarded-for`) is written to `out`, which is cleared first.
pub fn forward_request(
    buf: &[u8],
    client_ip: &[u8],
    out: &mut Vec<u8>,
) -> Result<Parsed<RequestHead>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        // HTTP/1.0 (and what httparse calls a bad version, which includes
        // the HTTP/2 preface) is for hyper to judge.
        Err(httparse::Error::Version) => return Ok(Parsed::HandOff),
        Err(e) => return Err(HeadError::from_httparse(e)),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Ok(Parsed::HandOff);
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Ok(Parsed::HandOff);
    }
    let headers = &*req.headers;
    let conn = connection_field(headers)?;
    let mut length = None;
    let mut hosts = 0;
    for h in headers {
        if is(h.name, b"transfer-encoding") || is(h.name, b"expect") {
            return Ok(Parsed::HandOff);
        }
        if is(h.name, b"host") {
            hosts += 1;
            if !valid_host(h.value) {
                return Err(HeadError::BadHost(
                    String::from_utf8_lossy(h.value).into_owned(),
                ));
            }
        }
        if is(h.name, b"content-length") {
            if length.is_some() {
                return Ok(Parsed::HandOff);
            }
            length = Some(parse_length(h.value)?);
        }
    }
    // RFC 9112 §3.2: one Host, or a 400.
    if hosts != 1 {
        return Err(HeadError::HostCount(hosts));
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff: Option<&[u8]> = None;
    let mut more_xff = Vec::new();
    for h in headers {
        // The length goes out as parsed, once, whatever Connection names
        // (a client naming content-length there must not leave the origin
        // reading its body as the next request); Host always goes out.
        if is(h.name, b"content-length") || (hop_by_hop(h.name, &conn) && !is(h.name, b"host")) {
            continue;
        }
        if is(h.name, b"x-forwarded-for") {
            match xff {
                None => xff = Some(h.value),
                Some(_) => more_xff.push(h.value),
            }
            continue;
        }
        put_field(out, h.name.as_bytes(), h.value);
    }
    if let Some(n) = length {
        put_number(out, b"content-length", n);
    }
    let asks_upgrade = method == "GET"
        && length.unwrap_or(0) == 0
        && !conn.close
        && conn
            .named
            .iter()
            .any(|t| t.eq_ignore_ascii_case(b"upgrade"))
        && headers.iter().any(|h| {
            is(h.name, b"upgrade") && tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"websocket"))
        });
    let upgrade = if asks_upgrade {
        websocket_key(headers)
    } else {
        None
    };
    if upgrade.is_some() {
        put_field(out, b"connection", b"upgrade");
        put_field(out, b"upgrade", b"websocket");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for prev in xff.into_iter().chain(more_xff) {
        out.extend_from_slice(prev.trim_ascii());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip);
    out.extend_from_slice(b"\r\n\r\n");
    Ok(Parsed::Done(RequestHead {
        len,
        body: match length {
            None | Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
        },
        head_method: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        keep_alive: !conn.close,
        upgrade,
    }))
}

/// Parses the response head at the start of `buf`, the answer to `asked`.
/// The head to send to the client is written to `out` (cleared first):
/// HTTP/1.1, hop-by-hop fields removed; for a final response also
/// `x-sextant-origin: origin`, and `connection: close` when the client
/// connection ends after it (the client asked so, or a body that only the
/// origin's close delimits). An interim 1xx goes out with no framing
/// field. A `101` is final when `asked.upgrade` (and must switch to
/// `websocket`); it goes out with `connection: upgrade`.
pub fn forward_response(
    buf: &[u8],
    asked: Asked,
    origin: &[u8],
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, HeadError> {
    let Asked {
        head_method,
        keep_alive,
        upgrade,
    } = asked;
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::from_httparse(e)),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let status = resp.code.unwrap_or(0);
    let version = resp.version.unwrap_or(0);
    if !(100..=599).contains(&status) {
        return Err(HeadError::BadStatus(status));
    }
    if status == 101 && upgrade.is_none() {
        return Err(HeadError::UnexpectedUpgrade);
    }
    let headers = &*resp.headers;
    let conn = connection_field(headers)?;
    let upgraded = status == 101;
    let interim = (100..200).contains(&status) && !upgraded;
    // A 101 must switch to websocket, with the accept key of this very
    // handshake: then it comes from a WebSocket server that read it, not
    // from an application that can be made to answer 101 (which would
    // give the client a raw channel to the origin, past this proxy).
    let switches = || {
        headers.iter().any(|h| {
            is(h.name, b"upgrade") && h.value.trim_ascii().eq_ignore_ascii_case(b"websocket")
        })
    };
    // Base64: compared case-sensitively.
    let accepted = |a: WebSocketAccept| {
        headers
            .iter()
            .any(|h| is(h.name, b"sec-websocket-accept") && h.value.trim_ascii() == a)
    };
    if upgraded && !(switches() && upgrade.is_some_and(accepted)) {
        return Err(HeadError::BadUpgrade);
    }
    let mut chunked = false;
    let mut length = None;
    for h in headers {
        if is(h.name, b"transfer-encoding") {
            if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::BadTransferEncoding(
                    String::from_utf8_lossy(h.value).into_owned(),
                ));
            }
            chunked = true;
        } else if is(h.name, b"content-length") {
            let n = parse_length(h.value)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::ConflictingLength);
            }
            length = Some(n);
        }
    }
    let body = if head_method || status < 200 || status == 204 || status == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    // A chunked answer that also gives a length, or chunked from HTTP/1.0,
    // is read as chunked (RFC 9112 §6.3) but the connection is not trusted
    // with another request. Nor is it after a HEAD: an origin sending the
    // body anyway (a common bug) would have it read as the next request's
    // answer, and it may come too late for the pool's peek to see it.
    let doubtful = (chunked && (length.is_some() || version == 0)) || head_method;
    let reusable = body != Framing::Close
        && !conn.close
        && !doubtful
        && !upgraded
        && (version == 1 || conn.keep_alive);
    let close = !interim && !upgraded && (!keep_alive || body == Framing::Close);
    out.clear();
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let framing_field = |name: &str| is(name, b"content-length") || is(name, b"transfer-encoding");
    for h in headers {
        // A bodiless response keeps its content-length (a HEAD's says the
        // size of the GET), except a 1xx or a 204, which must not have one
        // (RFC 9110 §8.6; after a 101 the bytes are another protocol's);
        // otherwise the framing is written once below.
        let framing =
            framing_field(h.name) && (body != Framing::None || status < 200 || status == 204);
        if framing || hop_by_hop(h.name, &conn) || is(h.name, b"x-sextant-origin") {
            continue;
        }
        put_field(out, h.name.as_bytes(), h.value);
    }
    match body {
        Framing::Length(n) => put_number(out, b"content-length", n),
        Framing::Chunked => put_field(out, b"transfer-encoding", b"chunked"),
        Framing::None | Framing::Close => {}
    }
    if upgraded {
        put_field(out, b"x-sextant-origin", origin);
        put_field(out, b"connection", b"upgrade");
        put_field(out, b"upgrade", b"websocket");
    } else if !interim {
        put_field(out, b"x-sextant-origin", origin);
        if close {
            put_field(out, b"connection", b"close");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        len,
        status,
        interim,
        body,
        reusable,
        upgraded,
        close,
    }))
}

/// A response the proxy makes itself, `sextant-edge: WHAT` (the same
/// text the hyper path answers with).
pub fn local_response(status: hyper::StatusCode, what: &str, close: bool) -> Vec<u8> {
    let body = local_body(what);
    let mut out = Vec::with_capacity(128 + body.len());
    let reason = status.canonical_reason().unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_u16());
    put_field(&mut out, b"content-type", b"text/plain; charset=utf-8");
    put_number(&mut out, b"content-length", body.len() as u64);
    if close {
        put_field(&mut out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

/// The body of an answer the proxy makes itself.
pub fn local_body(what: impl std::fmt::Display) -> String {
    format!("{LOCAL_PREFIX}{what}\n")
}

/// The length of [`local_body`]`(what)`.
pub fn local_body_len(what: &str) -> u64 {
    (LOCAL_PREFIX.len() + what.len() + 1) as u64
}

const LOCAL_PREFIX: &str = "sextant-edge: ";

/// Why a chunked body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body at byte {offset}: {what}")]
pub struct ChunkError {
    pub offset: u64,
    pub what: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size.
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeWs,
    /// A chunk extension, up to CR.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line, or the final CRLF.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Finds the end of a chunked body passing through, without copying it.
#[derive(Debug, Clone)]
pub struct ChunkedEnd {
    state: Chunk,
    size: u64,
    /// Significant hex digits of the size (leading zeros do not count).
    digits: u8,
    /// A digit of the current size was read.
    any_digit: bool,
    /// Bytes of the body seen, for error offsets.
    seen: u64,
}

impl Default for ChunkedEnd {
    fn default() -> Self {
        Self {
            state: Chunk::Size,
            size: 0,
            digits: 0,
            any_digit: false,
            seen: 0,
        }
    }
}

impl ChunkedEnd {
    /// Feeds the next bytes of the body; returns how many of them belong to
    /// it (all of them, unless it ended inside `data`) and whether it ended.
    pub fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), ChunkError> {
        if self.state == Chunk::Done {
            return Ok((0, true));
        }
        let mut i = 0;
        while i < data.len() {
            if self.state == Chunk::Data {
                let take = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - i);
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = Chunk::DataCr;
                }
                continue;
            }
            let b = data[i];
            let err = |what| ChunkError {
                offset: self.seen + i as u64,
                what,
            };
            self.state = match (self.state, b) {
                (Chunk::Size, b) if b.is_ascii_hexdigit() => {
                    let d = (b as char).to_digit(16).unwrap_or(0);
                    if self.size != 0 || d != 0 {
                        if self.digits == 15 {
                            return Err(err("chunk size too large"));
                        }
                        self.digits += 1;
                    }
                    self.any_digit = true;
                    self.size = self.size * 16 + u64::from(d);
                    Chunk::Size
                }
                (Chunk::Size, _) if !self.any_digit => return Err(err("expected a chunk size")),
                (Chunk::Size | Chunk::SizeWs, b' ' | b'\t') => Chunk::SizeWs,
                (Chunk::Size | Chunk::SizeWs, b';') => Chunk::Ext,
                // Whitespace after a size belongs before an extension (RFC
                // 9112 §7.1.1), but is tolerated before CRLF, as hyper does.
                (Chunk::Size | Chunk::SizeWs | Chunk::Ext, b'\r') => Chunk::SizeLf,
                (Chunk::Size | Chunk::SizeWs, _) => {
                    return Err(err("bad character after a chunk size"))
                }
                (Chunk::Ext, b'\n') => return Err(err("bare LF in a chunk extension")),
                (Chunk::Ext, b) if b.is_ascii_control() && b != b'\t' => {
                    return Err(err("control character in a chunk extension"))
                }
                (Chunk::Ext, _) => Chunk::Ext,
                (Chunk::SizeLf, b'\n') => {
                    self.digits = 0;
                    self.any_digit = false;
                    if self.size == 0 {
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data
                    }
                }
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::Size,
                (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
                (Chunk::TrailerStart | Chunk::TrailerLine, b'\n') => {
                    return Err(err("bare LF in a trailer"))
                }
                (Chunk::TrailerLine, b'\r') => Chunk::TrailerLf,
                (Chunk::TrailerStart, b' ' | b'\t') => return Err(err("folded trailer line")),
                (Chunk::TrailerStart | Chunk::TrailerLine, b)
                    if b.is_ascii_control() && b != b'\t' =>
                {
                    return Err(err("control character in a trailer"))
                }
                (Chunk::TrailerStart | Chunk::TrailerLine, _) => Chunk::TrailerLine,
                (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
                (Chunk::EndLf, b'\n') => Chunk::Done,
                (
                    Chunk::SizeLf | Chunk::DataCr | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf,
                    _,
                ) => return Err(err("expected CRLF")),
                // Data is consumed above and Done returns below.
                (Chunk::Data | Chunk::Done, _) => return Err(err("chunk state out of order")),
            };
            i += 1;
            if self.state == Chunk::Done {
                self.seen += i as u64;
                return Ok((i, true));
            }
        }
        self.seen += i as u64;
        Ok((i, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A GET on a kept-alive connection.
    const KEEP_ALIVE: Asked = Asked {
        head_method: false,
        keep_alive: true,
        upgrade: None,
    };

    fn request(raw: &str) -> (Result<Parsed<RequestHead>, HeadError>, String) {
        let mut out = Vec::new();
        let r = forward_request(raw.as_bytes(), b"10.0.0.9", &mut out);
        (r, String::from_utf8_lossy(&out).into_owned())
    }

    fn response(raw: &str, head_method: bool, keep_alive: bool) -> (ResponseHead, String) {
        let asked = Asked {
            head_method,
            keep_alive,
            upgrade: None,
        };
        answer_to(raw.as_bytes(), asked)
    }

    /// A complete, valid response to `asked`, and the head the client gets.
    fn answer_to(raw: &[u8], asked: Asked) -> (ResponseHead, String) {
        let mut out = Vec::new();
        let r = forward_response(raw, asked, b"a", &mut out)
            .expect("valid response")
            .expect("complete response");
        (r, String::from_utf8_lossy(&out).into_owned())
    }

    fn response_error(raw: &str) -> HeadError {
        let mut out = Vec::new();
        forward_response(raw.as_bytes(), KEEP_ALIVE, b"a", &mut out).expect_err("refused")
    }

    #[test]
    fn a_request_head_loses_its_hop_by_hop_fields_and_gains_the_client() {
        let raw =
            "GET /p?q=1 HTTP/1.1\r\nHost: www.example.com\r\nConnection: keep-alive, X-Secret\r\n\
                   X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n\
                   Proxy-Authorization: x\r\nX-Forwarded-For: 192.0.2.1\r\nAccept: */*\r\n\
                   x-forwarded-for: 192.0.2.2 \r\n\r\nNEXT";
        let (r, out) = request(raw);
        assert_eq!(
            r,
            Ok(Parsed::Done(RequestHead {
                len: raw.len() - 4,
                body: Framing::None,
                head_method: false,
                idempotent: true,
                keep_alive: true,
                upgrade: None,
            }))
        );
        assert_eq!(
            out,
            "GET /p?q=1 HTTP/1.1\r\nHost: www.example.com\r\nAccept: */*\r\n\
             x-forwarded-for: 192.0.2.1, 192.0.2.2, 10.0.0.9\r\n\r\n"
        );
    }

    #[test]
    fn a_websocket_handshake_keeps_its_upgrade_and_nothing_else_does() {
        let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
        let raw = format!(
            "GET /chat HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n\
             Upgrade: WebSocket\r\n{key}\r\n"
        );
        let (r, out) = request(&raw);
        assert!(
            matches!(r, Ok(Parsed::Done(ref h)) if h.upgrade == Some(ACCEPT) && h.keep_alive),
            "{r:?}"
        );
        assert_eq!(
            out,
            format!(
                "GET /chat HTTP/1.1\r\nHost: h\r\n{key}connection: upgrade\r\n\
                 upgrade: websocket\r\nx-forwarded-for: 10.0.0.9\r\n\r\n"
            )
        );
        // Not a WebSocket handshake: the upgrade is removed, as before.
        for raw in [
            // Upgrade without Connection naming it.
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n",
            // Another protocol.
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
            // Not a GET, or with a body (RFC 6455 §4.1).
            "POST / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
             Content-Length: 2\r\n\r\nhi",
            // The client closes after this exchange.
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close, upgrade\r\nUpgrade: websocket\r\n\r\n",
        ]
        .into_iter()
        .map(|r| r.replace("\r\n\r\n", &format!("\r\n{key}\r\n")))
        .chain(
            [
                // No key, two keys, a key that is not 16 bytes, version 8.
                "Sec-WebSocket-Version: 13\r\n",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\
                 Sec-WebSocket-Version: 13\r\n",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZQ==\r\nSec-WebSocket-Version: 13\r\n",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n",
            ]
            .map(|k| {
                format!(
                    "GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n{k}\r\n"
                )
            }),
        ) {
            let (r, out) = request(&raw);
            assert!(
                matches!(r, Ok(Parsed::Done(ref h)) if h.upgrade.is_none()),
                "{raw:?}: {r:?}"
            );
            let lower = out.to_ascii_lowercase();
            assert!(
                !lower.contains("upgrade") && !lower.contains("http2-settings"),
                "{out}"
            );
        }
    }

    /// RFC 6455 §1.3's example: the answer to `dGhlIHNhbXBsZSBub25jZQ==`.
    const ACCEPT: WebSocketAccept = *b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    #[test]
    fn a_switch_to_websocket_is_passed_on_only_when_asked_for() {
        assert_eq!(websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="), ACCEPT);
        let asked = Asked {
            head_method: false,
            keep_alive: true,
            upgrade: Some(ACCEPT),
        };
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nContent-Length: 5\r\n\r\nframe";
        let (r, out) = answer_to(raw, asked);
        assert_eq!(
            (r.len, r.status, r.interim, r.upgraded, r.reusable, r.body),
            (raw.len() - 5, 101, false, true, false, Framing::None)
        );
        assert_eq!(
            out,
            "HTTP/1.1 101 Switching Protocols\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nx-sextant-origin: a\r\n\
             connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        // Another protocol, or no key, another handshake's, or one in
        // another case: a 502, never a tunnel.
        let mut out = Vec::new();
        for bad in [
            "Upgrade: h2c\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n",
            "Upgrade: websocket\r\n",
            "Upgrade: websocket\r\nSec-WebSocket-Accept: HSmrc0sMlYUkAGmm5OPpG2HaGWk=\r\n",
            "Upgrade: websocket\r\nSec-WebSocket-Accept: S3PPLMBITXAQ9KYGZZHZRBK+XOO=\r\n",
        ] {
            let raw = format!("HTTP/1.1 101 Switching Protocols\r\n{bad}\r\n");
            assert_eq!(
                forward_response(raw.as_bytes(), asked, b"a", &mut out),
                Err(HeadError::BadUpgrade),
                "{bad}"
            );
        }
        assert_eq!(
            forward_response(&raw[..], KEEP_ALIVE, b"a", &mut out),
            Err(HeadError::UnexpectedUpgrade)
        );
        // An origin that declines answers as usual, and the connection
        // stays reusable.
        let no = b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n";
        let (r, _) = answer_to(no, asked);
        assert!(!r.upgraded && r.reusable && !r.interim, "{r:?}");
    }

    #[test]
    fn request_framing_and_keep_alive() {
        let done = |raw: &str| match request(raw).0 {
            Ok(Parsed::Done(h)) => h,
            other => panic!("{raw:?}: {other:?}"),
        };
        let h =
            done("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nConnection: close\r\n\r\n");
        assert_eq!(h.body, Framing::Length(12));
        assert!(!h.keep_alive);
        assert_eq!(
            done("POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 0\r\n\r\n").body,
            Framing::None
        );
        assert!(done("HEAD / HTTP/1.1\r\nHost: h\r\n\r\n").head_method);
        assert!(done("DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n").idempotent);
        assert!(!done("POST /x HTTP/1.1\r\nHost: h\r\n\r\n").idempotent);
        assert!(!done("PATCH /x HTTP/1.1\r\nHost: h\r\n\r\n").idempotent);
        let (_, out) = request("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc");
        assert!(out.contains("content-length: 3\r\n"), "{out}");
        // A length that Connection names still goes to the origin, or the
        // origin would read the body as a request of its own; so does Host.
        let raw = "POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length, host\r\nContent-Length: 30\r\n\r\n";
        let (r, out) = request(raw);
        assert!(matches!(
            r,
            Ok(Parsed::Done(RequestHead {
                body: Framing::Length(30),
                ..
            }))
        ));
        assert!(
            out.contains("content-length: 30\r\n") && out.contains("Host: a\r\n"),
            "{out}"
        );
        let (_, out) = request("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
        assert!(out.contains("content-length: 0\r\n"), "{out}");
    }

    #[test]
    fn a_request_needs_exactly_one_valid_host() {
        for (raw, want) in [
            ("GET / HTTP/1.1\r\n\r\n", HeadError::HostCount(0)),
            (
                "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
                HeadError::HostCount(2),
            ),
        ] {
            assert_eq!(request(raw).0, Err(want.clone()), "{raw:?}");
            assert_eq!(want.status(), 400);
        }
        for host in [
            "a, b",
            "a b",
            "u:p@a.example",
            "a/b",
            "a:80x",
            "[::1",
            "[::1,evil]",
            "a,b",
            "a%zz",
            "a:99999",
        ] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let want = HeadError::BadHost(host.into());
            assert_eq!(request(&raw).0, Err(want.clone()), "{raw:?}");
            assert_eq!(want.status(), 400);
        }
        for host in [
            "a.example",
            "A.Example.:8080",
            "xn--bcher-kva.example",
            "[::1]",
            "[::1]:443",
            "[fe80::1%25eth0]:80",
            "[v1.x:y]",
            "10.0.0.1:80",
            "a%41b",
            "a:",
            "",
        ] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert!(matches!(request(&raw).0, Ok(Parsed::Done(_))), "{raw:?}");
        }
    }

    #[test]
    fn proxy_connection_is_dropped_and_trailer_kept() {
        let (_, out) = request(
            "GET / HTTP/1.1\r\nHost: h\r\nProxy-Connection: keep-alive\r\nTrailer: x-sum\r\n\r\n",
        );
        assert!(
            !out.to_ascii_lowercase().contains("proxy-connection"),
            "{out}"
        );
        assert!(out.contains("Trailer: x-sum\r\n"), "{out}");
        let (_, out) = response(
            "HTTP/1.1 200 OK\r\nProxy-Connection: keep-alive\r\nTrailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            true,
        );
        assert!(
            !out.to_ascii_lowercase().contains("proxy-connection"),
            "{out}"
        );
        assert!(out.contains("Trailer: x-sum\r\n"), "{out}");
    }

    #[test]
    fn connection_may_name_only_so_many_fields() {
        let names = |n: usize| {
            (0..n)
                .map(|i| format!("x-{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ok = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close, {}\r\n\r\n",
            names(MAX_CONNECTION_OPTIONS)
        );
        assert!(matches!(request(&ok).0, Ok(Parsed::Done(_))));
        let many = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: {}\r\n\r\n",
            names(MAX_CONNECTION_OPTIONS + 1)
        );
        assert_eq!(request(&many).0, Err(HeadError::TooManyConnectionOptions));
        let resp = format!(
            "HTTP/1.1 200 OK\r\nConnection: {}\r\n\r\n",
            names(MAX_CONNECTION_OPTIONS + 1)
        );
        assert_eq!(response_error(&resp), HeadError::TooManyConnectionOptions);
    }

    #[test]
    fn a_204_loses_its_length_and_a_304_keeps_it() {
        let (h, out) = response(
            "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            false,
            true,
        );
        assert_eq!(h.body, Framing::None);
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out}"
        );
        let (h, out) = response(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            false,
            true,
        );
        assert_eq!(h.body, Framing::None);
        assert!(out.contains("Content-Length: 5\r\n"), "{out}");
    }

    #[test]
    fn incomplete_oversized_and_malformed_request_heads() {
        assert_eq!(
            request("GET / HTTP/1.1\r\nHost: x\r\n").0,
            Ok(Parsed::Partial)
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        let e = request(&big).0.expect_err("too large");
        assert_eq!((e.clone(), e.status()), (HeadError::TooLarge, 431));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let e = request(&format!("GET / HTTP/1.1\r\n{many}\r\n"))
            .0
            .expect_err("too many");
        assert_eq!((e.clone(), e.status()), (HeadError::TooManyHeaders, 431));
        let e = request("GARBAGE\r\n\r\n").0.expect_err("garbage");
        assert_eq!(e.status(), 400);
        for cl in ["abc", "-1", "1 2", "", "99999999999999999999"] {
            let e = request(&format!("POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n"))
                .0
                .expect_err(cl);
            assert!(matches!(e, HeadError::BadLength(_)), "{cl}: {e}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn what_the_fast_path_leaves_to_hyper() {
        for raw in [
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        ] {
            assert_eq!(request(raw).0, Ok(Parsed::HandOff), "{raw:?}");
        }
    }

    #[test]
    fn a_response_head_is_rewritten_for_the_client() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\
                   Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Sextant-Origin: spoof\r\n\r\nhello";
        let (r, out) = response(raw, false, true);
        assert_eq!(
            r,
            ResponseHead {
                len: raw.len() - 5,
                status: 200,
                interim: false,
                body: Framing::Length(5),
                reusable: true,
                upgraded: false,
                close: false,
            }
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ncontent-length: 5\r\nx-sextant-origin: a\r\n\r\n"
        );
        let (r, out) = response(
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            false,
            false,
        );
        assert!(
            r.close && out.ends_with("x-sextant-origin: a\r\nconnection: close\r\n\r\n"),
            "{out}"
        );
    }

    #[test]
    fn response_framing() {
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
            true,
        );
        assert_eq!(r.body, Framing::Chunked);
        assert!(
            out.contains("transfer-encoding: chunked\r\n") && !out.contains("ength"),
            "{out}"
        );
        // No length: the body ends when the origin closes, and so does the
        // client connection.
        let (r, out) = response("HTTP/1.1 200 OK\r\n\r\n", false, true);
        assert_eq!((r.body, r.reusable, r.close), (Framing::Close, false, true));
        assert!(out.contains("connection: close\r\n"), "{out}");
        // A HEAD response keeps the length of the GET and has no body.
        let (r, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", true, true);
        assert_eq!(r.body, Framing::None);
        assert!(out.contains("Content-Length: 100\r\n"), "{out}");
        for status in ["204 No Content", "304 Not Modified"] {
            let (r, _) = response(&format!("HTTP/1.1 {status}\r\n\r\n"), false, true);
            assert_eq!((r.body, r.reusable), (Framing::None, true), "{status}");
        }
        let (r, _) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n",
            false,
            true,
        );
        assert_eq!(r.body, Framing::Length(2));
        // Keep-alive towards the origin.
        let (r, _) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            false,
            true,
        );
        assert!(!r.reusable);
        let (r, _) = response("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false, true);
        assert!(!r.reusable);
        let (r, _) = response(
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
            false,
            true,
        );
        assert!(r.reusable);
        // Chunked with a length, or chunked from HTTP/1.0: read as chunked,
        // not trusted again.
        let (r, _) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
            true,
        );
        assert_eq!((r.body, r.reusable), (Framing::Chunked, false));
        let (r, _) = response(
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
            false,
            true,
        );
        assert_eq!((r.body, r.reusable), (Framing::Chunked, false));
        // Interim responses are passed on, without hop-by-hop or framing
        // fields and without the origin's name (the final answer has it).
        let (r, out) = response(
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nConnection: x-h\r\nX-H: 1\r\n\
             Content-Length: 0\r\n\r\n",
            false,
            true,
        );
        assert!(r.interim && r.body == Framing::None, "{r:?}");
        assert_eq!(out, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n");
    }

    #[test]
    fn responses_the_proxy_refuses() {
        assert!(matches!(
            response_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            HeadError::BadTransferEncoding(_)
        ));
        assert!(matches!(
            response_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HeadError::BadTransferEncoding(_)
        ));
        assert_eq!(
            response_error("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            HeadError::ConflictingLength
        );
        assert_eq!(
            response_error("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
            HeadError::UnexpectedUpgrade
        );
        assert!(matches!(
            response_error("SPDY/3 200 OK\r\n\r\n"),
            HeadError::Parse(_)
        ));
        // Found by scripts/fuzz-h1: "003" is three digits, and 3.
        assert_eq!(
            response_error("HTTP/1.1 003 E\r\n\r\n"),
            HeadError::BadStatus(3)
        );
        assert_eq!(
            response_error("HTTP/1.1 600 X\r\n\r\n"),
            HeadError::BadStatus(600)
        );
        let mut out = Vec::new();
        assert_eq!(
            forward_response(b"HTTP/1.1 200 OK\r\nContent-Le", KEEP_ALIVE, b"a", &mut out),
            Ok(None)
        );
    }

    #[test]
    fn a_local_response_is_complete() {
        let r = local_response(hyper::StatusCode::BAD_GATEWAY, "down", true);
        assert_eq!(
            String::from_utf8(r).expect("text"),
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 19\r\nconnection: close\r\n\r\nsextant-edge: down\n"
        );
    }

    /// Feeds `body` in pieces of `step` bytes; returns where the body ended.
    fn chunked_end(body: &[u8], step: usize) -> Result<Option<usize>, ChunkError> {
        let mut d = ChunkedEnd::default();
        let mut at = 0;
        for piece in body.chunks(step.max(1)) {
            let (n, done) = d.feed(piece)?;
            at += n;
            if done {
                return Ok(Some(at));
            }
            assert_eq!(n, piece.len());
        }
        Ok(None)
    }

    #[test]
    fn the_end_of_a_chunked_body_is_found_in_any_pieces() {
        let body = b"5\r\nhello\r\n1A;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in 1..body.len() {
            assert_eq!(chunked_end(body, step), Ok(Some(end)), "pieces of {step}");
        }
        assert_eq!(chunked_end(b"0\r\n\r\n", 100), Ok(Some(5)));
        // Leading zeros do not make a size too large; whitespace may come
        // before an extension.
        assert_eq!(
            chunked_end(b"00000000000000000001 ;a=b\r\nx\r\n0\r\n\r\n", 100),
            Ok(Some(35))
        );
        assert_eq!(chunked_end(b"5\r\nhel", 100), Ok(None));
        let mut d = ChunkedEnd::default();
        assert_eq!(d.feed(b"0\r\n\r\n"), Ok((5, true)));
        assert_eq!(d.feed(b"more"), Ok((0, true)));
    }

    #[test]
    fn malformed_chunked_bodies_are_refused_with_their_offset() {
        for (body, offset, what) in [
            (&b"x\r\n"[..], 0, "expected a chunk size"),
            (b"5\r\nhelloX", 8, "expected CRLF"),
            (b"5\nhello", 1, "bad character after a chunk size"),
            (b"0\r\nX: 1\n", 7, "bare LF in a trailer"),
            (b"5;a\n", 3, "bare LF in a chunk extension"),
            (b"1234567890abcdef0\r\n", 15, "chunk size too large"),
            (b"5 junk\r\n", 2, "bad character after a chunk size"),
            (b"5;a\x00b\r\n", 3, "control character in a chunk extension"),
            (b"0\r\n folded\r\n", 3, "folded trailer line"),
            (b"0\r\nX: a\x00\r\n", 7, "control character in a trailer"),
        ] {
            assert_eq!(
                chunked_end(body, 1),
                Err(ChunkError { offset, what }),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    proptest! {
        #[test]
        fn encoded_chunks_end_exactly_where_they_were_written(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            step in 1usize..64,
            tail in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut body = Vec::new();
            for c in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let end = body.len();
            body.extend_from_slice(&tail);
            prop_assert_eq!(chunked_end(&body, step), Ok(Some(end)));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = chunked_end(&bytes, 7);
            let mut out = Vec::new();
            let _ = forward_request(&bytes, b"127.0.0.1", &mut out);
            let _ = forward_response(&bytes, KEEP_ALIVE, b"a", &mut out);
        }
    }
}
