//! The HTTP/1 proxy codec: one parser (httparse for heads, `body.rs` for framing) on the
//! client side and the backend side, heads rewritten while copied, bodies forwarded as they
//! are validated, backend connections pooled and driven by the request's own task.
pub mod body;
mod bridge;
pub mod buf;
pub mod conn;
mod exchange;
pub mod head;
pub mod pool;
pub mod response;
mod tunnel;
pub mod write;

pub use conn::{ClientIo, serve};

#[cfg(test)]
mod tests {
    /// The worst inputs for each parser run on a thread with a 256 KiB stack: nothing recurses
    /// per line, chunk or segment.
    #[test]
    fn worst_cases_fit_a_small_stack() {
        let t = std::thread::Builder::new().stack_size(256 * 1024).spawn(|| {
            let mut trailers = b"0\r\n".to_vec();
            for _ in 0..100_000 {
                trailers.extend_from_slice(b"a:\r\n");
            }
            let mut c = super::body::Chunked::new(usize::MAX);
            assert!(c.feed(&trailers).is_ok());
            let mut chunks = Vec::new();
            for _ in 0..100_000 {
                chunks.extend_from_slice(b"1;x=y\r\na\r\n");
            }
            let mut c = super::body::Chunked::new(1024);
            assert_eq!(c.feed(&chunks), Ok(chunks.len()));
            let mut head = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
            for i in 0..250 {
                head.extend_from_slice(format!("X-{i}: {}\r\n", "v".repeat(200)).as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            let parsed = super::head::parse(&head, &mut Vec::new(), 256, 1 << 20);
            assert!(matches!(parsed, Ok(Some(_))));
            let path = "/a/..".repeat(20_000) + &"/%2e%2e".repeat(20_000);
            let mut out = Vec::new();
            assert!(crate::l7::path::normalize(&path, &mut out));
            assert_eq!(out, b"/");
        });
        t.unwrap().join().expect("no stack overflow");
    }
}

#[cfg(test)]
mod size {
    /// What every idle keep-alive connection holds is this task's state (the busy part is
    /// boxed and freed when the connection parks): it must stay small.
    #[tokio::test]
    async fn an_idle_connection_holds_little() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let config = crate::config::Config::parse("").unwrap();
        let ctx = arc_swap::ArcSwap::from_pointee(crate::l7::proxy::Ctx {
            listener: "l".into(),
            router: crate::l7::route::Router::default(),
            upstreams: Default::default(),
            http: std::sync::Arc::new(config.http.clone()),
            tls: false,
            stats: crate::upstream::stats::listener("l"),
        });
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let peer = s.local_addr().unwrap();
        let fut = super::serve(s, peer, &ctx, &config.http, rx);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1024, "a parked connection's task holds {size} bytes");
    }
}
