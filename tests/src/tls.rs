//! The one TLS toolkit of the tests: self-signed certificates, rustls server and client
//! configs, and a blocking rustls client that can send its ClientHello in any fragmentation
//! and either checks an echo ([`tls_client`]) or sends one HTTP request ([`https_request`]).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    sync::Arc,
};

pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::T;

/// A self-signed certificate for `names` and its key.
pub fn cert(names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("rcgen");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_pair.serialize_der()));
    (c.cert.der().clone(), key)
}

pub fn server_config(
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
) -> Arc<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .expect("server config");
    c.alpn_protocols = vec![b"lb-test".to_vec()];
    Arc::new(c)
}

/// A client trusting exactly `roots`.
pub fn client_config(roots: &[&CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("root");
    }
    rustls::ClientConfig::builder().with_root_certificates(store).with_no_client_auth()
}

/// What a TLS client saw.
#[derive(Debug)]
pub struct TlsSeen {
    /// The leaf certificate the server presented.
    pub cert: CertificateDer<'static>,
    /// The backend's greeting line.
    pub line: String,
    /// What came back for the echo probe.
    pub echo: String,
}

/// Connects to `addr` with rustls (blocking; run it with spawn_blocking), writes the
/// ClientHello with `send_hello`, finishes the handshake, reads the greeting and checks an echo.
pub fn tls_client(
    addr: SocketAddr,
    sni: &str,
    config: rustls::ClientConfig,
    send_hello: impl FnOnce(&mut std::net::TcpStream, &[u8]),
) -> anyhow::Result<TlsSeen> {
    let name = ServerName::try_from(sni.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)?;
    }
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, T)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(T))?;
    tcp.set_write_timeout(Some(T))?;
    send_hello(&mut tcp, &hello);
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut line = String::new();
    BufReader::new(&mut tls).read_line(&mut line)?;
    anyhow::ensure!(!line.is_empty(), "no greeting: the connection closed");
    let cert = tls.conn.peer_certificates().and_then(|c| c.first()).cloned().expect("a cert");
    tls.write_all(b"ping through the tunnel")?;
    let mut echo = vec![0u8; 23];
    tls.read_exact(&mut echo)?;
    Ok(TlsSeen { cert, line: line.trim().to_string(), echo: String::from_utf8_lossy(&echo).into() })
}

/// Sends the ClientHello as rustls wrote it.
pub fn whole(tcp: &mut std::net::TcpStream, hello: &[u8]) {
    tcp.write_all(hello).expect("write hello");
}

/// Re-splits TLS records into records of at most `chunk` payload bytes (a valid fragmentation:
/// the handshake transcript covers messages, not records).
pub fn refragment(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= data.len() {
        let len = u16::from_be_bytes([data[pos + 3], data[pos + 4]]) as usize;
        let payload = &data[pos + 5..pos + 5 + len];
        for c in payload.chunks(chunk) {
            out.extend_from_slice(&data[pos..pos + 3]);
            out.extend_from_slice(&(c.len() as u16).to_be_bytes());
            out.extend_from_slice(c);
        }
        pos += 5 + len;
    }
    out
}

/// Writes `bytes` one at a time, each in its own TCP segment.
pub fn trickle(tcp: &mut std::net::TcpStream, bytes: &[u8]) {
    for b in bytes {
        tcp.write_all(std::slice::from_ref(b)).expect("write byte");
        std::thread::sleep(std::time::Duration::from_micros(300));
    }
}

/// Sends `request` over TLS to `addr` with SNI `sni`, trusting `roots`; returns the leaf
/// certificate the server presented and everything read until the close. Blocking.
pub fn https_request(
    addr: SocketAddr,
    sni: &str,
    roots: rustls::ClientConfig,
    request: &[u8],
) -> anyhow::Result<(Option<CertificateDer<'static>>, String)> {
    let name = ServerName::try_from(sni.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(roots), name)?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, T)?;
    tcp.set_read_timeout(Some(T))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request)?;
    let mut response = String::new();
    // A close without close_notify still ends the response.
    let _ = tls.read_to_string(&mut response);
    let cert = tls.conn.peer_certificates().and_then(|c| c.first()).cloned();
    Ok((cert, response))
}
