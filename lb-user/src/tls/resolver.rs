//! Chooses a listener's certificate by SNI: exact name first, then `*.` wildcard one label
//! deep, then the first certificate (clients that send no SNI, such as those using an IP).
use std::{collections::HashMap, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

use super::TlsError;
use crate::config::CertConfig;

#[derive(Debug, Default)]
struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

/// The certificates of one listener, swapped whole on reload.
#[derive(Debug)]
pub struct SniResolver {
    files: Vec<CertConfig>,
    certs: ArcSwap<Certs>,
}

impl SniResolver {
    /// Loads every certificate; names come from each certificate's DNS SANs.
    pub fn load(files: &[CertConfig]) -> Result<Self, TlsError> {
        let certs = load_all(files)?;
        Ok(Self { files: files.to_vec(), certs: ArcSwap::from_pointee(certs) })
    }

    /// Re-reads the files. On any error the old certificates stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.certs.store(Arc::new(load_all(&self.files)?));
        Ok(())
    }

    fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        if let Some(name) = sni.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) {
            if let Some(c) = certs.exact.get(&name) {
                return Some(c.clone());
            }
            if let Some(c) = name.split_once('.').and_then(|(_, parent)| certs.wildcard.get(parent))
            {
                return Some(c.clone());
            }
        }
        certs.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

fn load_all(files: &[CertConfig]) -> Result<Certs, TlsError> {
    let mut certs = Certs::default();
    for f in files {
        let (key, names) = load_one(&f.cert, &f.key)?;
        for name in names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => certs.wildcard.entry(parent.to_string()),
                None => certs.exact.entry(name),
            }
            .or_insert_with(|| key.clone());
        }
        certs.default.get_or_insert(key);
    }
    Ok(certs)
}

fn load_one(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, Vec<String>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| TlsError::Read { path: path.to_owned(), message: e.to_string() })
    };
    let invalid =
        |path: &Path, message: String| TlsError::Invalid { path: path.to_owned(), message };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert, e.to_string()))?;
    let leaf = chain.first().ok_or_else(|| invalid(cert, "no certificate in the file".into()))?;
    let names: Vec<String> = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| invalid(cert, format!("unreadable certificate: {e}")))?
        .valid_dns_names()
        .map(str::to_string)
        .collect();
    let der =
        PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| invalid(key, e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| invalid(key, format!("unsupported key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| invalid(key, format!("does not match {}: {e}", cert.display())))?;
    Ok((Arc::new(certified), names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> CertConfig {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
        CertConfig { cert, key }
    }

    fn leaf(c: &CertifiedKey) -> Vec<u8> {
        c.cert[0].to_vec()
    }

    #[test]
    fn exact_then_wildcard_then_default_and_reload() {
        let dir = std::env::temp_dir().join(format!("lb-sni-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = write_cert(&dir, "a", &["a.example.com"]);
        let w = write_cert(&dir, "w", &["*.example.com"]);
        let r = SniResolver::load(&[a.clone(), w]).unwrap();
        let a_der = leaf(&r.lookup(Some("a.example.com")).unwrap());
        let w_der = leaf(&r.lookup(Some("b.example.com")).unwrap());
        assert_ne!(a_der, w_der);
        assert_eq!(leaf(&r.lookup(Some("A.Example.COM.")).unwrap()), a_der);
        assert_eq!(leaf(&r.lookup(Some("x.y.example.com")).unwrap()), a_der, "one label only");
        assert_eq!(leaf(&r.lookup(None).unwrap()), a_der, "first is the default");

        write_cert(&dir, "a", &["a.example.com"]);
        r.reload().unwrap();
        assert_ne!(leaf(&r.lookup(Some("a.example.com")).unwrap()), a_der, "reloaded");
        std::fs::write(&a.key, "garbage").unwrap();
        assert!(r.reload().is_err());
        assert!(r.lookup(Some("a.example.com")).is_some(), "old certs stay");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
