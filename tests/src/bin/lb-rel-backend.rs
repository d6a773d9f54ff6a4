//! A backend process for the reliability tests: an HTTP/1.1 keep-alive server (tokio + hyper)
//! answering every request with its name, so a test can SIGKILL a real process and hold many
//! thousands of connections without a thread each.
//!
//! Usage: `lb-rel-backend NAME ADDR...` (inside a namespace with `ip netns exec`). It raises its
//! open-file limit to the hard limit and prints `ready` once every address is bound.
use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (name, addrs) = args.split_first().ok_or_else(|| anyhow::anyhow!("usage: NAME ADDR..."))?;
    lb_tests::procs::raise_nofile();
    let body = Bytes::from(format!("{name}\n"));
    let mut tasks = Vec::new();
    for a in addrs {
        let addr: SocketAddr = a.parse()?;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener: TcpListener = socket.listen(4096)?;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }
    println!("ready");
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
