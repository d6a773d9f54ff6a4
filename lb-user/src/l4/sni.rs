//! The TLS ClientHello as the L4 proxy sees it: SNI and ALPN read from the first bytes of a
//! stream (possibly split over several TLS records), and the SNI route table.
//!
//! Pure functions of `&[u8]` using only `std`: the fuzz targets include this file as is.
use std::collections::HashMap;

/// A handshake message larger than this is refused (real ClientHellos are a few hundred bytes to
/// a few KiB; post-quantum key shares add ~1.2 KiB).
pub const MAX_HELLO_LEN: usize = 64 * 1024;
/// The most bytes the parser reads before giving up (records add 5 bytes each).
pub const MAX_PEEK: usize = MAX_HELLO_LEN + 16 * 1024;

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// TLSPlaintext.length may not exceed 2^14.
const MAX_RECORD: usize = 1 << 14;

/// What the proxy needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The host name, lower-cased, trailing dot removed; `None` without a server_name extension.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
    /// Bytes of the stream (record headers included) that carry the ClientHello.
    pub len: usize,
}

/// Why the first bytes are not a usable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloError {
    /// The stream does not start with a TLS handshake record: some other protocol.
    NotTls,
    /// It claims to be TLS but is malformed.
    Malformed(&'static str),
    /// Larger than [`MAX_HELLO_LEN`] / [`MAX_PEEK`].
    TooLarge,
}

/// Parses the ClientHello at the start of `data`. `Ok(None)`: the bytes so far are a valid
/// prefix, read more. Never panics, whatever the input.
pub fn parse_client_hello(data: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    HelloReader::default().feed(data)
}

/// The ClientHello parser fed a stream in pieces as they arrive: each byte is looked at once
/// (a trickled hello costs linear work in all), record headers are read as soon as their 5
/// bytes are there, and what it holds is the handshake message alone (fragments reassembled),
/// grown with the bytes that came (at most twice them), never past the length its header
/// declares, so never more than [`MAX_HELLO_LEN`] + 4 bytes.
#[derive(Debug, Default)]
pub struct HelloReader {
    /// The record header being read, and how much of it has arrived.
    header: [u8; 5],
    header_len: usize,
    /// Records whose header has been read.
    records: usize,
    /// Bytes of the current record's fragment still to come.
    remaining: usize,
    /// The handshake message reassembled so far.
    msg: Vec<u8>,
    /// Its body length, once its 4-byte header is there.
    body_len: Option<usize>,
    /// Bytes of the stream consumed (record headers included).
    pos: usize,
    /// Bytes copied or parsed, for the test that a trickled hello costs linear work.
    #[cfg(test)]
    work: usize,
}

impl HelloReader {
    /// How many more bytes the reader can use now: the rest of a record header or of a
    /// record's fragment (at most 2^14), so a caller never reads past the ClientHello.
    pub fn wants(&self) -> usize {
        if self.remaining == 0 { 5 - self.header_len } else { self.remaining }
    }

    /// Takes the next bytes of the stream. `Ok(None)`: valid so far, feed more. After `Ok(Some)`
    /// or an error the reader is done; feeding it more is a caller bug but still never panics.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<Option<ClientHello>, HelloError> {
        while !data.is_empty() {
            if self.remaining == 0 {
                let take = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                self.pos += take;
                #[cfg(test)]
                {
                    self.work += take;
                }
                data = &data[take..];
                check_record_prefix(&self.header[..self.header_len], self.records == 0)?;
                if self.header_len < 5 {
                    return Ok(None);
                }
                let len = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                if len == 0 {
                    return Err(HelloError::Malformed("empty handshake record"));
                }
                if len > MAX_RECORD {
                    return Err(HelloError::Malformed("record longer than 2^14"));
                }
                if self.pos + len > MAX_PEEK {
                    return Err(HelloError::TooLarge);
                }
                (self.remaining, self.header_len) = (len, 0);
                self.records += 1;
                continue;
            }
            // Until the handshake header is complete, take only its 4 bytes: then the message's
            // length is known and the buffer is sized once.
            let room = match self.body_len {
                None => 4 - self.msg.len(),
                Some(n) => 4 + n - self.msg.len(),
            };
            let mut take = self.remaining.min(data.len());
            if take > room {
                if self.body_len.is_some() {
                    // Another handshake message shares the record: a client sends nothing
                    // after its ClientHello until the server answers.
                    return Err(HelloError::Malformed("data after the ClientHello"));
                }
                take = room;
            }
            if let Some(n) = self.body_len {
                // Grown with what arrives (doubling, never past the declared length), not
                // reserved for what the client claims it will send.
                let len = self.msg.len();
                let cap = (4 + n).min((len * 2).max(len + take));
                self.msg.reserve_exact(cap.saturating_sub(len));
            }
            self.msg.extend_from_slice(&data[..take]);
            #[cfg(test)]
            {
                self.work += take;
            }
            (self.remaining, self.pos) = (self.remaining - take, self.pos + take);
            data = &data[take..];
            if self.body_len.is_none() {
                self.body_len = handshake_len(&self.msg)?;
            }
            if let Some(n) = self.body_len
                && self.msg.len() == 4 + n
                && self.remaining == 0
            {
                #[cfg(test)]
                {
                    self.work += self.msg.len();
                }
                let mut hello = parse_body(&self.msg[4..])?;
                hello.len = self.pos;
                return Ok(Some(hello));
            }
        }
        Ok(None)
    }
}

/// Checks a (possibly partial) record header: handshake type, TLS major version 3.
fn check_record_prefix(h: &[u8], first: bool) -> Result<(), HelloError> {
    let bad = |e| if first { HelloError::NotTls } else { e };
    if h.first().is_some_and(|&t| t != RECORD_HANDSHAKE) {
        return Err(bad(HelloError::Malformed("non-handshake record inside the ClientHello")));
    }
    if h.get(1).is_some_and(|&major| major != 3) {
        return Err(bad(HelloError::Malformed("record version is not 3.x")));
    }
    if h.get(2).is_some_and(|&minor| minor > 4) {
        return Err(bad(HelloError::Malformed("record version is not 3.0-3.4")));
    }
    Ok(())
}

/// The body length once the 4-byte handshake header is there; checks the type early.
fn handshake_len(msg: &[u8]) -> Result<Option<usize>, HelloError> {
    if msg.first().is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO) {
        return Err(HelloError::Malformed("first handshake message is not a ClientHello"));
    }
    let Some(h) = msg.get(..4) else { return Ok(None) };
    let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
    if len > MAX_HELLO_LEN {
        return Err(HelloError::TooLarge);
    }
    Ok(Some(len))
}

/// A bounds-checked reader over one byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if n > self.buf.len() {
            return Err(HelloError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a 1- or 2-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)? as usize;
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader { buf: body };
    let version = r.u16("truncated legacy_version")?;
    if version >> 8 != 3 {
        return Err(HelloError::Malformed("ClientHello version is not 3.x"));
    }
    r.take(32, "truncated random")?;
    if r.vec8("truncated session id")?.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32"));
    }
    let suites = r.vec16("truncated cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("bad cipher suite list"));
    }
    if r.vec8("truncated compression methods")?.is_empty() {
        return Err(HelloError::Malformed("no compression method"));
    }
    let mut hello = ClientHello::default();
    if r.is_empty() {
        return Ok(hello); // No extensions at all (TLS 1.0-era clients).
    }
    let mut exts = Reader { buf: r.vec16("truncated extensions")? };
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !exts.is_empty() {
        let ty = exts.u16("truncated extension type")?;
        let data = exts.vec16("truncated extension")?;
        match ty {
            EXT_SERVER_NAME => {
                // Two answers to "which host" would let the proxy and the backend disagree.
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(HelloError::Malformed("two server_name extensions"));
                }
                hello.sni = parse_sni(data)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(HelloError::Malformed("two ALPN extensions"));
                }
                hello.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { buf: data };
    let mut list = Reader { buf: r.vec16("truncated server name list")? };
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the server name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8("truncated server name type")?;
        let name = list.vec16("truncated server name")?;
        if kind != 0 {
            continue; // Only host_name (0) is defined; skip unknown kinds.
        }
        if host.is_some() {
            return Err(HelloError::Malformed("two host names"));
        }
        let valid = !name.is_empty()
            && name.len() <= 255
            && name.iter().all(|&b| b.is_ascii_graphic() && b != b'/' && b != b'\\');
        if !valid {
            return Err(HelloError::Malformed("server name is not a host name"));
        }
        let s = String::from_utf8_lossy(name).to_ascii_lowercase();
        let s = s.strip_suffix('.').unwrap_or(&s).to_string();
        if s.is_empty() {
            return Err(HelloError::Malformed("server name is not a host name"));
        }
        host = Some(s);
    }
    Ok(host)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut r = Reader { buf: data };
    let mut list = Reader { buf: r.vec16("truncated ALPN list")? };
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the ALPN list"));
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let p = list.vec8("truncated ALPN protocol")?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

/// SNI routes: exact names, and `*.domain` matching every name under the domain, the longest
/// domain winning. Hosts are lower-cased without a trailing dot, as [`parse_client_hello`]
/// returns them.
#[derive(Debug, Clone)]
pub struct SniRoutes<T> {
    exact: HashMap<String, T>,
    /// Keyed by ".domain" (with the dot) so a suffix test never matches inside a label.
    wildcard: HashMap<String, T>,
}

impl<T> Default for SniRoutes<T> {
    fn default() -> Self {
        Self { exact: HashMap::new(), wildcard: HashMap::new() }
    }
}

impl<T> SniRoutes<T> {
    /// Adds a route; `host` is `name` or `*.domain` (any case, trailing dot allowed).
    pub fn insert(&mut self, host: &str, action: T) {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        match h.strip_prefix('*') {
            Some(domain) if domain.starts_with('.') => {
                self.wildcard.insert(domain.to_string(), action);
            }
            _ => {
                self.exact.insert(h, action);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The route for a host name, if any.
    pub fn find(&self, host: &str) -> Option<&T> {
        if let Some(a) = self.exact.get(host) {
            return Some(a);
        }
        // Longest suffix first: "a.b.example.com" tries ".b.example.com", then ".example.com"...
        let mut rest = host;
        while let Some(i) = rest.find('.') {
            let suffix = &rest[i..];
            if let Some(a) = self.wildcard.get(suffix) {
                return Some(a);
            }
            rest = &rest[i + 1..];
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with the given extensions, as one handshake message (no record).
    fn handshake(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut e = Vec::new();
        for (ty, data) in exts {
            e.extend(ty.to_be_bytes());
            e.extend((data.len() as u16).to_be_bytes());
            e.extend(data);
        }
        body.extend((e.len() as u16).to_be_bytes());
        body.extend(e);
        let mut msg = vec![1];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut d = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        d.push(0);
        d.extend((name.len() as u16).to_be_bytes());
        d.extend(name);
        (0, d)
    }

    fn alpn_ext(protos: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut l = Vec::new();
        for p in protos {
            l.push(p.len() as u8);
            l.extend(*p);
        }
        let mut d = (l.len() as u16).to_be_bytes().to_vec();
        d.extend(l);
        (16, d)
    }

    /// Splits a handshake message into records of at most `chunk` bytes.
    fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in msg.chunks(chunk) {
            out.extend([22, 3, 1]);
            out.extend((c.len() as u16).to_be_bytes());
            out.extend(c);
        }
        out
    }

    #[test]
    fn reads_sni_and_alpn_and_needs_every_byte() {
        let msg = handshake(&[
            (10, vec![0, 2, 0, 29]),
            sni_ext(b"Db.Example.COM."),
            alpn_ext(&[b"h2", b"http/1.1"]),
        ]);
        let data = records(&msg, 1 << 14);
        let hello = parse_client_hello(&data).unwrap().unwrap();
        assert_eq!(hello.sni.as_deref(), Some("db.example.com"));
        assert_eq!(hello.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(hello.len, data.len());
        for n in 0..data.len() {
            assert_eq!(parse_client_hello(&data[..n]), Ok(None), "prefix of {n} bytes");
        }
    }

    #[test]
    fn reassembles_fragments_across_many_records() {
        let msg = handshake(&[sni_ext(b"a.example"), (21, vec![0; 40_000])]);
        let small = handshake(&[sni_ext(b"a.example"), (21, vec![0; 600])]);
        for (msg, chunk) in [(&small, 1), (&msg, 7), (&msg, 100), (&msg, 16384)] {
            let data = records(msg, chunk);
            let hello = parse_client_hello(&data).unwrap().unwrap();
            assert_eq!(hello.sni.as_deref(), Some("a.example"), "chunk {chunk}");
            assert_eq!(hello.len, data.len());
        }
        // 1-byte records quintuple the size: past MAX_PEEK, refused rather than buffered.
        assert_eq!(parse_client_hello(&records(&msg, 1)), Err(HelloError::TooLarge));
    }

    /// Feeds `data` in pieces split at `cuts`; the first answer that is not `Ok(None)`.
    fn fed(data: &[u8], cuts: &[usize]) -> (Result<Option<ClientHello>, HelloError>, HelloReader) {
        let mut r = HelloReader::default();
        let mut at = 0;
        for &c in cuts.iter().chain([&data.len()]) {
            match r.feed(&data[at..c]) {
                Ok(None) => at = c,
                done => return (done, r),
            }
        }
        (Ok(None), r)
    }

    #[test]
    fn every_split_point_gives_the_answer_of_the_whole() {
        let msg = handshake(&[sni_ext(b"split.example"), alpn_ext(&[b"h2"]), (21, vec![0; 300])]);
        let mut bad = msg.clone();
        bad.push(0);
        let mut not_tls = records(&msg, 200);
        not_tls[0] = b'G';
        for data in [records(&msg, 1 << 14), records(&msg, 100), records(&bad, 100), not_tls] {
            let whole = parse_client_hello(&data);
            for i in 0..=data.len() {
                assert_eq!(fed(&data, &[i]).0, whole, "split at {i}");
                // And a second cut anywhere after it.
                let j = (i + 7 * (i % 13) + 1).min(data.len());
                assert_eq!(fed(&data, &[i, j]).0, whole, "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn a_trickled_hello_costs_linear_work_and_holds_only_the_message() {
        let msg = handshake(&[sni_ext(b"slow.example"), (21, vec![0; 40_000])]);
        let data = records(&msg, 16_000);
        let cuts: Vec<usize> = (1..data.len()).collect();
        let (got, r) = fed(&data, &cuts);
        assert_eq!(got.unwrap().unwrap().sni.as_deref(), Some("slow.example"));
        // Each byte copied once, the message parsed once: no re-parse per wake-up.
        assert!(r.work <= data.len() + msg.len(), "work {} for {} bytes", r.work, data.len());
        assert!(
            r.msg.capacity() <= msg.len() + 8,
            "holds {} for a {} message",
            r.msg.capacity(),
            msg.len()
        );
        // Whatever the reader is in, it never asks past the current record.
        let mut r = HelloReader::default();
        assert_eq!(r.wants(), 5);
        r.feed(&data[..3]).unwrap();
        assert_eq!(r.wants(), 2);
        r.feed(&data[3..5]).unwrap();
        assert_eq!(r.wants(), 16_000);
    }

    #[test]
    fn no_sni_no_extensions_and_other_name_types() {
        let data = records(&handshake(&[alpn_ext(&[b"h2"])]), 512);
        assert_eq!(parse_client_hello(&data).unwrap().unwrap().sni, None);
        // Without any extension block.
        let mut msg = handshake(&[]);
        msg.truncate(msg.len() - 2);
        msg[3] -= 2;
        assert_eq!(parse_client_hello(&records(&msg, 512)).unwrap().unwrap().sni, None);
    }

    #[test]
    fn tells_not_tls_from_the_first_byte() {
        assert_eq!(parse_client_hello(b"G"), Err(HelloError::NotTls));
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotTls));
        assert_eq!(parse_client_hello(&[22, 2]), Err(HelloError::NotTls));
        assert_eq!(parse_client_hello(&[]), Ok(None));
        assert_eq!(parse_client_hello(&[22]), Ok(None));
    }

    #[test]
    fn refuses_malformed_hellos() {
        let good = handshake(&[sni_ext(b"x.example")]);
        let cases: Vec<Vec<u8>> = vec![
            vec![22, 3, 1, 0, 0],           // empty record
            vec![22, 3, 1, 0x40, 1],        // record > 2^14
            records(&[2, 0, 0, 0], 100),    // ServerHello
            records(&[1, 0, 0, 1, 9], 100), // body too short
            records(&[1, 2, 0, 0], 100),    // > MAX_HELLO_LEN
            records(&handshake(&[sni_ext(b"a"), sni_ext(b"b")]), 512),
            records(&handshake(&[sni_ext(b"a b")]), 512),
            records(&handshake(&[sni_ext(b"")]), 512),
            records(&handshake(&[alpn_ext(&[b""])]), 512),
            records(&handshake(&[(0, vec![0, 9, 0])]), 512),
            {
                let mut d = records(&good, 10);
                d[15] = 23; // second record is application data
                d
            },
            {
                let mut m = good.clone();
                m.push(0); // a byte after the message, in the same record
                records(&m, 512)
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let r = parse_client_hello(c);
            assert!(
                matches!(r, Err(HelloError::Malformed(_) | HelloError::TooLarge)),
                "case {i}: {r:?}"
            );
        }
    }

    #[test]
    fn routes_exact_then_longest_wildcard() {
        let mut r = SniRoutes::default();
        r.insert("db.example.com", 1);
        r.insert("*.example.com", 2);
        r.insert("*.EU.example.com.", 3);
        assert_eq!(r.find("db.example.com"), Some(&1));
        assert_eq!(r.find("www.example.com"), Some(&2));
        assert_eq!(r.find("a.b.example.com"), Some(&2));
        assert_eq!(r.find("x.eu.example.com"), Some(&3));
        assert_eq!(r.find("eu.example.com"), Some(&2));
        assert_eq!(r.find("example.com"), None);
        assert_eq!(r.find("badexample.com"), None);
        assert_eq!(r.find(""), None);
    }
}
