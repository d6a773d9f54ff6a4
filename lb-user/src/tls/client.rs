//! TLS from the proxy to backends: verified against a CA file or the Mozilla roots.
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use super::TlsError;
use crate::config::UpstreamTls;

/// A client config for one group's backends (ALPN is set by the connector).
pub fn client_config(tls: &UpstreamTls) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| TlsError::Read { path: path.clone(), message: e.to_string() })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| TlsError::Invalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                roots.add(cert).map_err(|e| TlsError::Invalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth())
}
