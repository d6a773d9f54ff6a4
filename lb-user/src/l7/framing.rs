//! Strict HTTP/1 message framing, on top of what hyper (httparse) already rejects: a request
//! whose body length could be read two ways is refused before anything is forwarded
//! (request smuggling, RFC 9112 §6.3).
use hyper::{HeaderMap, Version, header};

/// Why a request's framing is refused (400 and the connection closed).
pub fn check(version: Version, headers: &HeaderMap) -> Result<(), &'static str> {
    // A backend that maps `_` to `-` (CGI-style environments do) would read these as framing
    // headers we never checked; any version, since h2 requests go to HTTP/1 backends too.
    if headers.contains_key("transfer_encoding") || headers.contains_key("content_length") {
        return Err("a framing header spelled with an underscore");
    }
    if version != Version::HTTP_11 && version != Version::HTTP_10 {
        return Ok(());
    }
    let cl: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    let te: Vec<_> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !cl.is_empty() && !te.is_empty() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if cl.len() > 1 {
        return Err("more than one Content-Length");
    }
    if let Some(v) = cl.first() {
        let b = v.as_bytes();
        if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
            return Err("invalid Content-Length");
        }
    }
    if !te.is_empty() {
        if version == Version::HTTP_10 {
            return Err("Transfer-Encoding in HTTP/1.0");
        }
        // Only plain chunked: any other coding leaves the length to guesswork.
        if te.len() > 1 || !te[0].as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err("Transfer-Encoding other than chunked");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn ambiguous_lengths_are_refused() {
        let v = Version::HTTP_11;
        assert!(check(v, &h(&[("content-length", "5")])).is_ok());
        assert!(check(v, &h(&[("transfer-encoding", "Chunked")])).is_ok());
        for bad in [
            h(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            h(&[("content-length", "5"), ("content-length", "5")]),
            h(&[("content-length", "5, 5")]),
            h(&[("content-length", "+5")]),
            h(&[("content-length", "")]),
            h(&[("transfer-encoding", "gzip, chunked")]),
            h(&[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")]),
            h(&[("transfer-encoding", "xchunked")]),
            h(&[("content-length", "5"), ("transfer_encoding", "chunked")]),
            h(&[("content_length", "5")]),
        ] {
            assert!(check(v, &bad).is_err(), "{bad:?}");
        }
        assert!(check(Version::HTTP_10, &h(&[("transfer-encoding", "chunked")])).is_err());
        assert!(
            check(Version::HTTP_2, &h(&[("content-length", "1"), ("content-length", "1")])).is_ok()
        );
    }
}
