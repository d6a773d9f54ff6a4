//! HTTP/1 request heads: parsed once with httparse, checked against the rules a proxy must
//! hold (RFC 9112 §3, §6.3, RFC 9110 §7.2), and kept as byte ranges into the connection's own
//! buffer so nothing is copied or allocated per request.
use super::body::{Framing, is_tchar};

/// httparse's header slots: more fields than this is 431 whatever `max_headers` says.
pub const MAX_FIELDS: usize = 256;

/// A byte range of the head (offsets from the head's first byte).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn of<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        &head[self.start as usize..self.end as usize]
    }
    fn within(outer: &[u8], inner: &[u8]) -> Self {
        let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
        Self { start: start as u32, end: (start + inner.len()) as u32 }
    }
}

/// Header fields the proxy acts on; everything else is `Other` and forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    Te,
    /// Hop-by-hop fields that are always dropped (Keep-Alive, Proxy-Connection,
    /// Proxy-Authorization, HTTP2-Settings).
    Hop,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    Forwarded,
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: Span,
    pub value: Span,
    pub kind: Kind,
}

/// Request methods the proxy treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Options,
    Trace,
    Put,
    Delete,
    Other,
}

impl Method {
    /// Safe to send twice (RFC 9110 §9.2.2).
    pub fn is_idempotent(self) -> bool {
        self != Self::Other
    }
}

/// A checked request head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Bytes of the head, final CRLF included.
    pub len: usize,
    pub method: Method,
    pub method_span: Span,
    /// HTTP/1.0 (0) or HTTP/1.1 (1).
    pub minor: u8,
    /// Origin-form path and query (`*` for `OPTIONS *`); empty for an absolute form without
    /// a path (see [`Head::path`]).
    path: Span,
    /// The authority: an absolute-form target's, else the Host field's (None: no Host).
    pub authority: Option<Span>,
    pub framing: Framing,
    /// The client asked for the connection to end after this exchange.
    pub close: bool,
    /// An HTTP/1.1 upgrade (`Connection: upgrade` + `Upgrade`): the protocols asked for.
    pub upgrade: Option<Span>,
    /// `TE: trailers`: the client takes response trailers (forwarded to the backend).
    pub te_trailers: bool,
    /// `Connection` names other fields, which are dropped with it.
    pub conn_other: bool,
}

impl Head {
    /// The origin-form target: `/` for `http://host` (RFC 9112 §3.2.1).
    pub fn path<'a>(&self, hb: &'a [u8]) -> &'a [u8] {
        if self.path.start == self.path.end { b"/" } else { self.path.of(hb) }
    }
}

/// Why a head is refused; the response status follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// 400 with this reason.
    Bad(&'static str),
    /// 431.
    TooLarge,
    /// 405: CONNECT (a reverse proxy does not tunnel to arbitrary hosts).
    Method,
}

/// Parses the head at the start of `buf`: `Ok(None)` when more bytes are needed. `fields` is
/// the connection's reusable list, filled on success.
pub fn parse(
    buf: &[u8],
    fields: &mut Vec<Field>,
    max_headers: usize,
    max_head: usize,
) -> Result<Option<Head>, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => {
            // A bare LF is refused as soon as it is seen, not after the header timeout.
            return if has_bare_lf(buf) {
                Err(HeadError::Bad("bare LF in head"))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    };
    if len > max_head {
        return Err(HeadError::TooLarge);
    }
    let head = &buf[..len];
    // httparse takes a lone LF as a line end; a backend that does not would see another head.
    if has_bare_lf(head) {
        return Err(HeadError::Bad("bare LF in head"));
    }
    if req.headers.len() > max_headers {
        return Err(HeadError::TooLarge);
    }
    let method_text = req.method.unwrap_or_default();
    let method = match method_text {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => return Err(HeadError::Method),
        _ => Method::Other,
    };
    let minor = req.version.unwrap_or(1);
    let target = req.path.unwrap_or_default().as_bytes();
    let (abs_authority, path) = split_target(target, method)?;

    fields.clear();
    let mut c = Collect::default();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let kind = kind_of(name)?;
        let field =
            Field { name: Span::within(head, name), value: Span::within(head, h.value), kind };
        c.see(&field, h.value)?;
        fields.push(field);
    }
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0.
    if c.hosts > 1 || (minor == 1 && c.hosts == 0) {
        return Err(HeadError::Bad("missing or repeated Host"));
    }
    let authority = match abs_authority {
        Some(a) => Some(Span::within(head, a)),
        None => c.host.map(|v| Span::within(head, v)),
    };
    if let Some(a) = c.host
        && !valid_authority(a, true)
    {
        return Err(HeadError::Bad("invalid Host"));
    }
    let framing = c.framing(minor)?;
    let upgrade = match (minor, c.conn_upgrade, c.upgrade) {
        // h2c upgrades are not offered: the request is served as HTTP/1.1.
        (1, true, Some(u)) if !has_token(u, b"h2c") => Some(Span::within(head, u)),
        _ => None,
    };
    let close = c.conn_close || (minor == 0 && !c.conn_keep_alive);
    Ok(Some(Head {
        len,
        method,
        method_span: Span::within(head, method_text.as_bytes()),
        minor,
        path: Span::within(head, path),
        authority,
        framing,
        close,
        upgrade,
        te_trailers: c.te_trailers,
        conn_other: c.conn_other,
    }))
}

fn has_bare_lf(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// Splits a request target into an absolute form's authority and the origin-form rest.
fn split_target(target: &[u8], method: Method) -> Result<(Option<&[u8]>, &[u8]), HeadError> {
    // The returned path is always a slice of `target` (empty: `/`), so its span is computable.
    if target.first() == Some(&b'/') {
        return Ok((None, target));
    }
    if target == b"*" {
        return if method == Method::Options {
            Ok((None, target))
        } else {
            Err(HeadError::Bad("asterisk target outside OPTIONS"))
        };
    }
    let rest = strip_prefix_ci(target, b"http://")
        .or_else(|| strip_prefix_ci(target, b"https://"))
        .ok_or(HeadError::Bad("invalid request target"))?;
    let end = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || !valid_authority(authority, false) {
        return Err(HeadError::Bad("invalid authority in request target"));
    }
    // `http://a?x` has an empty path and a query: refused (no client sends it).
    if path.first() != Some(&b'/') {
        return if path.is_empty() {
            Ok((Some(authority), path))
        } else {
            Err(HeadError::Bad("invalid request target"))
        };
    }
    Ok((Some(authority), path))
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// RFC 3986 authority characters (host and port); no userinfo. An empty Host is allowed
/// (RFC 9112 §3.2), an empty absolute-form authority is not.
fn valid_authority(a: &[u8], allow_empty: bool) -> bool {
    (allow_empty || !a.is_empty())
        && a.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b))
}

pub(super) fn kind_of(name: &[u8]) -> Result<Kind, HeadError> {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    // A backend that maps `_` to `-` (CGI-style environments do) would read these as framing
    // fields the proxy never checked.
    if is("transfer_encoding") || is("content_length") {
        return Err(HeadError::Bad("a framing header spelled with an underscore"));
    }
    Ok(match name.len() {
        4 if is("host") => Kind::Host,
        2 if is("te") => Kind::Te,
        7 if is("upgrade") => Kind::Upgrade,
        9 if is("forwarded") => Kind::Forwarded,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::Hop,
        14 if is("content-length") => Kind::ContentLength,
        14 if is("http2-settings") => Kind::Hop,
        15 if is("x-forwarded-for") => Kind::XForwardedFor,
        16 if is("x-forwarded-host") => Kind::XForwardedHost,
        16 if is("proxy-connection") => Kind::Hop,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        17 if is("x-forwarded-proto") => Kind::XForwardedProto,
        19 if is("proxy-authorization") => Kind::Hop,
        _ => Kind::Other,
    })
}

/// What the field pass learns.
#[derive(Default)]
struct Collect<'a> {
    hosts: u8,
    host: Option<&'a [u8]>,
    lengths: u8,
    length: Option<&'a [u8]>,
    codings: u8,
    coding: Option<&'a [u8]>,
    upgrade: Option<&'a [u8]>,
    conn_close: bool,
    conn_keep_alive: bool,
    conn_upgrade: bool,
    conn_other: bool,
    te_trailers: bool,
}

impl<'a> Collect<'a> {
    fn see(&mut self, f: &Field, value: &'a [u8]) -> Result<(), HeadError> {
        match f.kind {
            Kind::Host => {
                self.hosts = self.hosts.saturating_add(1);
                self.host = Some(value);
            }
            Kind::ContentLength => {
                self.lengths = self.lengths.saturating_add(1);
                self.length = Some(value);
            }
            Kind::TransferEncoding => {
                self.codings = self.codings.saturating_add(1);
                self.coding = Some(value);
            }
            Kind::Upgrade => self.upgrade = Some(value),
            Kind::Te => self.te_trailers |= has_token(value, b"trailers"),
            Kind::Connection => {
                for t in tokens(value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        self.conn_close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        self.conn_keep_alive = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        self.conn_upgrade = true;
                    } else if !t.eq_ignore_ascii_case(b"te") {
                        if !t.iter().all(|&b| is_tchar(b)) {
                            return Err(HeadError::Bad("invalid Connection"));
                        }
                        self.conn_other = true;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// RFC 9112 §6.3, strictly: a length that could be read two ways is refused.
    fn framing(&self, minor: u8) -> Result<Framing, HeadError> {
        if self.lengths > 0 && self.codings > 0 {
            return Err(HeadError::Bad("both Content-Length and Transfer-Encoding"));
        }
        if self.lengths > 1 {
            return Err(HeadError::Bad("more than one Content-Length"));
        }
        if let Some(v) = self.length {
            return match parse_length(v) {
                Some(0) => Ok(Framing::Empty),
                Some(n) => Ok(Framing::Length(n)),
                None => Err(HeadError::Bad("invalid Content-Length")),
            };
        }
        if let Some(v) = self.coding {
            if minor == 0 {
                return Err(HeadError::Bad("Transfer-Encoding in HTTP/1.0"));
            }
            // Only plain chunked: any other coding leaves the length to guesswork.
            if self.codings > 1 || !v.eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::Bad("Transfer-Encoding other than chunked"));
            }
            return Ok(Framing::Chunked);
        }
        Ok(Framing::Empty)
    }
}

/// A Content-Length value: 1 to 19 digits, nothing else.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// The comma-separated tokens of a field value, trimmed.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii()).filter(|t| !t.is_empty())
}

pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value).any(|t| {
        // `trailers` may carry parameters elsewhere (`gzip;q=0.5`); compare the name only.
        let name = t.split(|&b| b == b';').next().unwrap_or(t).trim_ascii();
        name.eq_ignore_ascii_case(token)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> Result<Option<Head>, HeadError> {
        parse(bytes, &mut Vec::new(), 100, 65536)
    }

    #[test]
    fn a_plain_get() {
        let b = b"GET /a?b HTTP/1.1\r\nHost: x.test\r\nTE: trailers\r\n\r\nnext";
        let h = head(b).unwrap().unwrap();
        assert_eq!(h.len, b.len() - 4);
        assert_eq!(h.path(b), b"/a?b");
        assert_eq!(h.authority.unwrap().of(b), b"x.test");
        assert_eq!(
            (h.method, h.minor, h.framing, h.close),
            (Method::Get, 1, Framing::Empty, false)
        );
        assert!(h.te_trailers);
    }

    #[test]
    fn absolute_form_authority_wins() {
        let b = b"GET http://a.test:8080/p HTTP/1.1\r\nHost: b.test\r\n\r\n";
        let h = head(b).unwrap().unwrap();
        assert_eq!(h.authority.unwrap().of(b), b"a.test:8080");
        assert_eq!(h.path(b), b"/p");
        let b = b"GET http://a.test HTTP/1.1\r\nHost: a.test\r\n\r\n";
        assert_eq!(head(b).unwrap().unwrap().path(b), b"/");
    }

    #[test]
    fn host_rules() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(HeadError::Bad(_))), "{bad:?}");
        }
        let h = head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.authority.is_none() && h.close, "1.0 without Host is fine and closes");
    }

    #[test]
    fn framing_rules() {
        let ok = |b: &[u8]| head(b).unwrap().unwrap().framing;
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Framing::Chunked
        );
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\nY: b\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\n\n",
        ] {
            assert!(matches!(head(bad), Err(HeadError::Bad(_))), "{bad:?}");
        }
    }

    #[test]
    fn upgrades_need_connection_upgrade_and_h2c_is_not_one() {
        let b = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(head(b).unwrap().unwrap().upgrade.unwrap().of(b), b"websocket");
        let b = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n";
        assert!(head(b).unwrap().unwrap().upgrade.is_none());
        let b = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade, http2-settings\r\nUpgrade: h2c\r\n\r\n";
        assert!(head(b).unwrap().unwrap().upgrade.is_none());
    }

    #[test]
    fn limits_and_partial_heads() {
        assert_eq!(head(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().map(|h| h.len), None);
        assert_eq!(
            head(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap_err(),
            HeadError::Method
        );
        let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..300 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(head(&many).unwrap_err(), HeadError::TooLarge);
    }
}
