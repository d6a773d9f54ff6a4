//! tokio backends for the L4 tests, on loopback or on a listener bound inside a namespace: a
//! TCP echo that names itself, a UDP echo, a backend that reads PROXY headers with its own
//! independent parser, one that resets its connections, and a TLS server with its own certificate. Each needs a runtime.
use std::net::{IpAddr, SocketAddr};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
    sync::mpsc,
};

use crate::{
    T,
    tls::{CertificateDer, cert, server_config},
};

/// A TLS server with its own certificate. Per connection: finishes the handshake, writes
/// `"<name> sni=<sni> alpn=<alpn>\n"`, then echoes until EOF.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub cert: CertificateDer<'static>,
    _task: tokio::task::JoinHandle<()>,
}

impl TlsBackend {
    pub async fn start(name: &str, names: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name, names).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str, names: &[&str]) -> Self {
        let listener = std::net::TcpListener::bind(addr).expect("bind tls backend");
        Self::on(listener, name, names)
    }

    /// Serves on a listener bound elsewhere (e.g. inside a namespace). Needs a runtime.
    pub fn on(listener: std::net::TcpListener, name: &str, names: &[&str]) -> Self {
        let (cert, key) = cert(names);
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&cert, &key));
        let name = name.to_string();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, name) = (acceptor.clone(), name.clone());
                tokio::spawn(async move { serve_tls(acceptor, tcp, &name).await });
            }
        });
        Self { addr, cert, _task: task }
    }
}

/// Serves one TLS connection as [`TlsBackend`] describes; also used for the L7 hand-off.
pub async fn serve_tls<S>(acceptor: tokio_rustls::TlsAcceptor, tcp: S, name: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(Ok(mut tls)) = tokio::time::timeout(T, acceptor.accept(tcp)).await else { return };
    let (_, conn) = tls.get_ref();
    let sni = conn.server_name().unwrap_or("-").to_string();
    let alpn = conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned());
    let line = format!("{name} sni={sni} alpn={}\n", alpn.as_deref().unwrap_or("-"));
    if tls.write_all(line.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(T, tls.read(&mut buf)).await {
        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = tls.shutdown().await;
}

/// A TCP backend: writes `"<name>\n"`, echoes until the client's FIN, then writes `"eof\n"` and
/// closes: a client that half-closes still gets everything.
pub async fn echo_backend(addr: SocketAddr, name: &str) -> SocketAddr {
    echo_backend_on(std::net::TcpListener::bind(addr).expect("bind echo backend"), name)
}

/// On each connection: reads to EOF, then writes the number of bytes it read (`"12345\n"`) and
/// closes. A blocking thread per connection with 1 MiB reads: faster than a task in a debug
/// build, so bulk tests measure the proxy rather than this backend.
pub fn counting_backend_on(listener: std::net::TcpListener) -> SocketAddr {
    use std::io::{Read as _, Write as _};
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(T));
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(format!("{total}\n").as_bytes());
            });
        }
    });
    addr
}

/// On each connection: waits `delay` without reading, then reads to EOF checking that byte `i`
/// is `i % 251`, and answers `"ok N\n"` (N bytes read) or `"bad at I\n"`. A blocking thread per
/// connection.
pub fn stalling_backend(delay: std::time::Duration) -> SocketAddr {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind stalling backend");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = s.set_read_timeout(Some(T));
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0u64;
                loop {
                    let n = match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(_) => return,
                    };
                    if let Some(i) = (0..n).find(|&i| buf[i] != ((total + i as u64) % 251) as u8) {
                        let _ = s.write_all(format!("bad at {}\n", total + i as u64).as_bytes());
                        return;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(format!("ok {total}\n").as_bytes());
            });
        }
    });
    addr
}

/// On each connection: reads what comes, writes `"bye\n"`, waits a moment (so the answer is
/// relayed on), then resets the connection (SO_LINGER 0). On loopback, port 0 picks a port.
pub async fn resetting_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind resetting backend");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = tokio::time::timeout(T, s.read(&mut buf)).await;
                let _ = s.write_all(b"bye\n").await;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let _ = s.set_zero_linger();
            });
        }
    });
    addr
}

/// [`echo_backend`] on a listener bound elsewhere (e.g. inside a namespace). Needs a runtime.
pub fn echo_backend_on(listener: std::net::TcpListener, name: &str) -> SocketAddr {
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = TcpListener::from_std(listener).expect("tokio listener");
    let addr = listener.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 8192];
                loop {
                    match tokio::time::timeout(T, s.read(&mut buf)).await {
                        Ok(Ok(0)) => break,
                        Ok(Ok(n)) if s.write_all(&buf[..n]).await.is_ok() => {}
                        _ => return,
                    }
                }
                let _ = s.write_all(b"eof\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A UDP backend answering each datagram with `"<name>:" + datagram`.
pub async fn udp_echo(addr: SocketAddr, name: &str) -> SocketAddr {
    udp_echo_on(std::net::UdpSocket::bind(addr).expect("bind udp backend"), name)
}

/// [`udp_echo`] on a socket bound elsewhere (e.g. inside a namespace). Needs a runtime.
pub fn udp_echo_on(sock: std::net::UdpSocket, name: &str) -> SocketAddr {
    sock.set_nonblocking(true).expect("nonblocking");
    let sock = UdpSocket::from_std(sock).expect("tokio socket");
    let addr = sock.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let mut reply = format!("{name}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from).await;
        }
    });
    addr
}

/// What a PROXY-protocol backend read before the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySeen {
    pub version: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The bytes after the header, up to the client's FIN.
    pub payload: Vec<u8>,
}

/// A backend that expects a PROXY header and reports it, parsed independently of lb's parser
/// (fixed offsets for v2, split on spaces for v1). Answers each connection with "ok\n".
pub async fn proxy_backend() -> (SocketAddr, mpsc::UnboundedReceiver<anyhow::Result<ProxySeen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy backend");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let r = tokio::time::timeout(T, s.read_to_end(&mut all)).await;
                let seen = match r {
                    Ok(Ok(_)) => read_proxy_header(&all),
                    _ => Err(anyhow::anyhow!("backend read failed or timed out")),
                };
                let _ = s.write_all(b"ok\n").await;
                let _ = tx.send(seen);
            });
        }
    });
    (addr, rx)
}

fn read_proxy_header(all: &[u8]) -> anyhow::Result<ProxySeen> {
    const SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    if all.starts_with(SIG) {
        anyhow::ensure!(all.len() >= 16 && all[12] == 0x21, "v2 PROXY command expected");
        let len = u16::from_be_bytes([all[14], all[15]]) as usize;
        let b = &all[16..16 + len];
        let (src, dst) = match all[13] {
            0x11 => {
                let ip = |i: usize| IpAddr::from([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                (SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)))
            }
            0x21 => {
                let ip = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&b[i..i + 16]).unwrap());
                let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                (SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34)))
            }
            f => anyhow::bail!("unexpected v2 family {f:#x}"),
        };
        return Ok(ProxySeen { version: 2, src, dst, payload: all[16 + len..].to_vec() });
    }
    let end = all.windows(2).position(|w| w == b"\r\n").ok_or(anyhow::anyhow!("no CRLF"))?;
    let line = std::str::from_utf8(&all[..end])?;
    let f: Vec<&str> = line.split(' ').collect();
    anyhow::ensure!(f.len() == 6 && f[0] == "PROXY", "not a v1 line: {line:?}");
    let src = SocketAddr::new(f[2].parse()?, f[4].parse()?);
    let dst = SocketAddr::new(f[3].parse()?, f[5].parse()?);
    Ok(ProxySeen { version: 1, src, dst, payload: all[end + 2..].to_vec() })
}
