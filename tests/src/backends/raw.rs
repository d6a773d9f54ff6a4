//! A raw HTTP/1.1 backend that records the exact bytes of every request it receives, so a test
//! asserts on what was forwarded, not on what hyper made of it.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// One request as a backend received it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The head, request line and header lines, without the final empty line.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or_default()
    }

    /// Values of header `name` (case-insensitive), in order.
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    /// Why this request's framing could be read two ways, if it could.
    pub fn ambiguity(&self) -> Option<String> {
        let cl = self.headers("content-length");
        let te = self.headers("transfer-encoding");
        let names: Vec<&str> = self
            .head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(n, _)| n)
            .collect();
        if !cl.is_empty() && !te.is_empty() {
            return Some("Content-Length and Transfer-Encoding".into());
        }
        if cl.len() > 1 {
            return Some(format!("{} Content-Length headers", cl.len()));
        }
        if te.len() > 1 || te.first().is_some_and(|t| !t.eq_ignore_ascii_case("chunked")) {
            return Some(format!("Transfer-Encoding {te:?}"));
        }
        if let Some(bad) = names.iter().find(|n| {
            n.is_empty()
                || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        }) {
            return Some(format!("header name {bad:?}"));
        }
        if names.iter().any(|n| {
            n.replace('_', "-").eq_ignore_ascii_case("transfer-encoding") && n.contains('_')
        }) || names
            .iter()
            .any(|n| n.replace('_', "-").eq_ignore_ascii_case("content-length") && n.contains('_'))
        {
            return Some("a framing header spelled with an underscore".into());
        }
        if self.head.contains('\n')
            && self.head.split("\r\n").any(|l| l.contains('\n') || l.contains('\r'))
        {
            return Some("bare CR or LF in the head".into());
        }
        None
    }
}

/// An HTTP/1.1 backend on 127.0.0.1 that parses what it receives by hand (Content-Length or
/// chunked bodies) and records each request. Answers `200 ok` with Content-Length; a request for
/// `/http10` gets an HTTP/1.0 response delimited by closing the connection.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<RawRequest>>>,
    task: JoinHandle<()>,
}

impl RawBackend {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind raw backend");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &s).await;
                });
            }
        });
        Self { addr, seen, task }
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, seen: &Mutex<Vec<RawRequest>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    // Each `None` below is the client closing mid-request: the connection just ends.
    while let Some(head) = take_until(&mut stream, &mut buf, b"\r\n\r\n").await? {
        let mut req =
            RawRequest { head: String::from_utf8_lossy(&head).into_owned(), body: Vec::new() };
        let te = req.headers("transfer-encoding");
        if te.iter().any(|t| t.eq_ignore_ascii_case("chunked")) {
            loop {
                let Some(line) = take_until(&mut stream, &mut buf, b"\r\n").await? else {
                    return Ok(());
                };
                let line = String::from_utf8_lossy(&line).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
                if size == 0 {
                    // Trailers until an empty line.
                    loop {
                        match take_until(&mut stream, &mut buf, b"\r\n").await? {
                            None => return Ok(()),
                            Some(l) if l.is_empty() => break,
                            Some(_) => {}
                        }
                    }
                    break;
                }
                if !fill(&mut stream, &mut buf, size + 2).await? {
                    return Ok(());
                }
                req.body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        } else if let Some(cl) = req.headers("content-length").first() {
            let n: usize = cl.parse().map_err(|_| std::io::Error::other("bad content-length"))?;
            if !fill(&mut stream, &mut buf, n).await? {
                return Ok(());
            }
            req.body = buf.drain(..n).collect();
        }
        let http10 = req.path() == "/http10";
        seen.lock().unwrap().push(req);
        if http10 {
            stream
                .write_all(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil-close")
                .await?;
            return stream.shutdown().await;
        }
        stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await?;
    }
    Ok(())
}

/// The bytes of `buf` (read on from `stream` as needed) before the first `delim`, removed with
/// it; `None` if the stream ends first.
async fn take_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    delim: &[u8],
) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(p) = buf.windows(delim.len()).position(|w| w == delim) {
            let part = buf[..p].to_vec();
            buf.drain(..p + delim.len());
            return Ok(Some(part));
        }
        if !read_more(stream, buf).await? {
            return Ok(None);
        }
    }
}

/// Reads until `buf` holds at least `n` bytes; false if the stream ends first.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> std::io::Result<bool> {
    while buf.len() < n {
        if !read_more(stream, buf).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
        .await
        .map_err(|_| std::io::Error::other("backend read timeout"))??;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}
