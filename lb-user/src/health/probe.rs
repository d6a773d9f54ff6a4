//! One health check of one backend: a TCP connect, or an HTTP/1.1 GET (plain or TLS) whose
//! status line must carry the expected status. Written by hand: it reads one line.
use std::{net::SocketAddr, sync::Arc};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::config::{CheckKind, HealthConfig};

/// Probes `addr` once; the error says what failed. The caller bounds the time.
pub async fn probe(config: &HealthConfig, addr: SocketAddr) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    match config.kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http => get(stream, config, addr).await,
        CheckKind::Https => {
            let name = match &config.host {
                Some(h) => ServerName::try_from(h.clone()).map_err(|e| format!("host: {e}"))?,
                None => ServerName::IpAddress(addr.ip().into()),
            };
            let tls = tokio_rustls::TlsConnector::from(tls_config())
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            get(tls, config, addr).await
        }
    }
}

async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    config: &HealthConfig,
    addr: SocketAddr,
) -> Result<(), String> {
    let host = config.host.clone().unwrap_or_else(|| addr.to_string());
    let req = format!(
        "GET {} HTTP/1.1\r\nhost: {host}\r\nuser-agent: lb-health\r\nconnection: close\r\n\r\n",
        config.path
    );
    s.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            format!("not an HTTP status line: {:?}", line.lines().next().unwrap_or(""))
        })?;
    if status == config.expect {
        Ok(())
    } else {
        Err(format!("status {status}, expected {}", config.expect))
    }
}

/// TLS for checks: liveness, not identity, so the certificate is not verified (backends often
/// present certificates for names the balancer does not use); signatures still are.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the defaults")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn config(kind: &str, expect: u16) -> HealthConfig {
        toml::from_str(&format!("type = \"{kind}\"\npath = \"/healthz\"\nexpect = {expect}"))
            .unwrap()
    }

    /// A server answering each connection with `reply` once.
    async fn server(reply: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                // A TCP check sends nothing; an HTTP check asks for the configured path.
                if s.read(&mut buf).await.unwrap_or(0) > 0 {
                    assert!(buf.starts_with(b"GET /healthz HTTP/1.1\r\n"));
                    let _ = s.write_all(reply.as_bytes()).await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_and_http_checks() {
        let ok = server("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let bad = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert_eq!(probe(&config("tcp", 200), ok).await, Ok(()));
        assert_eq!(probe(&config("http", 200), ok).await, Ok(()));
        assert_eq!(probe(&config("http", 204), ok).await, Err("status 200, expected 204".into()));
        assert_eq!(probe(&config("http", 200), bad).await, Err("status 503, expected 200".into()));
        // Nothing listens on a port just released.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        assert!(probe(&config("tcp", 200), gone).await.unwrap_err().starts_with("connect"));
    }
}
