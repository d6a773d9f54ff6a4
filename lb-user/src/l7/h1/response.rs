//! HTTP/1 response heads from backends: parsed once with httparse, their body framing decided
//! by RFC 9112 §6.3, and kept as byte ranges into the upstream buffer.
use super::{
    body::Framing,
    head::{Field, Kind, Span, parse_length, tokens},
};

/// A backend's response head.
#[derive(Debug, Clone, Copy)]
pub struct Response {
    pub len: usize,
    pub code: u16,
    pub reason: Span,
    pub framing: Framing,
    /// The backend ends the connection after this response.
    pub close: bool,
    /// The field list names a hop-by-hop field other than the known ones.
    pub conn_other: bool,
    /// A 101's `Upgrade` value.
    pub upgrade: Option<Span>,
}

impl Response {
    /// 1xx other than 101: forwarded, then the final response follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.code) && self.code != 101
    }
}

/// Parses the head at the start of `buf`; `Ok(None)` when more bytes are needed. `head_request`:
/// the request was HEAD, so no body follows whatever the fields say.
pub fn parse(
    buf: &[u8],
    fields: &mut Vec<Field>,
    head_request: bool,
    max_head: usize,
) -> Result<Option<Response>, &'static str> {
    let mut slots = [httparse::EMPTY_HEADER; super::head::MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err("response head too large");
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed response head"),
    };
    let head = &buf[..len];
    let code = resp.code.unwrap_or(0);
    // httparse takes any three digits; RFC 9110 §15 defines 100 to 599 ("050" would be
    // written on as a two-digit status line).
    if !(100..=599).contains(&code) {
        return Err("status code outside 100-599");
    }
    let minor = resp.version.unwrap_or(1);
    fields.clear();
    let (mut lengths, mut length, mut coding, mut upgrade) = (0u8, None, None, None);
    let (mut close, mut keep_alive, mut conn_other) = (false, false, false);
    for h in resp.headers.iter() {
        let kind = super::head::kind_of(h.name.as_bytes()).unwrap_or(Kind::Other);
        let span = |s: &[u8]| {
            let start = (s.as_ptr() as usize - head.as_ptr() as usize) as u32;
            Span { start, end: start + s.len() as u32 }
        };
        fields.push(Field { name: span(h.name.as_bytes()), value: span(h.value), kind });
        match kind {
            Kind::ContentLength => {
                lengths = lengths.saturating_add(1);
                length = Some(h.value);
            }
            Kind::TransferEncoding => {
                if coding.is_some() {
                    return Err("more than one Transfer-Encoding");
                }
                coding = Some(h.value);
            }
            Kind::Upgrade => upgrade = Some(span(h.value)),
            Kind::Connection => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    } else if !t.eq_ignore_ascii_case(b"upgrade") {
                        conn_other = true;
                    }
                }
            }
            _ => {}
        }
    }
    let no_body = head_request || (100..200).contains(&code) || code == 204 || code == 304;
    let framing = if no_body {
        Framing::Empty
    } else if let Some(c) = coding {
        // Chunked must be the final (and here the only) coding; CL is then ignored and dropped.
        if !c.eq_ignore_ascii_case(b"chunked") {
            return Err("Transfer-Encoding other than chunked");
        }
        Framing::Chunked
    } else if let Some(v) = length {
        if lengths > 1 {
            return Err("more than one Content-Length");
        }
        match parse_length(v) {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => return Err("invalid Content-Length"),
        }
    } else {
        Framing::Close
    };
    Ok(Some(Response {
        len,
        code,
        reason: Span {
            start: resp.reason.map_or(0, |r| (r.as_ptr() as usize - head.as_ptr() as usize) as u32),
            end: resp
                .reason
                .map_or(0, |r| (r.as_ptr() as usize - head.as_ptr() as usize + r.len()) as u32),
        },
        framing,
        close: close || (minor == 0 && !keep_alive) || framing == Framing::Close,
        conn_other,
        upgrade,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(b: &[u8], head: bool) -> Result<Option<Response>, &'static str> {
        parse(b, &mut Vec::new(), head, 65536)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let f = |b: &[u8]| resp(b, false).unwrap().unwrap().framing;
        assert_eq!(f(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"), Framing::Length(3));
        assert_eq!(f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), Framing::Chunked);
        assert_eq!(f(b"HTTP/1.1 200 OK\r\n\r\n"), Framing::Close);
        assert_eq!(f(b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n"), Framing::Empty);
        assert_eq!(f(b"HTTP/1.1 100 Continue\r\n\r\n"), Framing::Empty);
        let h = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let r = resp(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap().unwrap();
        assert!(r.close, "1.0 without keep-alive closes");
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 050 OK\r\n\r\n",
            b"HTTP/1.1 600 OK\r\n\r\n",
        ] {
            assert!(resp(bad, false).is_err(), "{bad:?}");
        }
    }
}
