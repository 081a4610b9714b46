//! TLS for HTTPS and WSS: a configured certificate, or a self-signed one made on first start and
//! kept in the data folder so browsers that accepted it once keep accepting it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: no PEM {what} in it")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("making a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's certificate chain and key, ready for rustls.
pub struct TlsMaterial {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// True when made here (development default).
    pub self_signed: bool,
    pub cert_path: PathBuf,
}

impl TlsMaterial {
    /// Loads `cert` and `key`, or (both `None`) the self-signed pair in `data_dir/tls`, making
    /// it on first start.
    pub fn load_or_create(cert: Option<&Path>, key: Option<&Path>, data_dir: &Path) -> Result<Self, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Self::load(cert, key, false),
            _ => {
                let dir = data_dir.join("tls");
                let cert = dir.join("cert.pem");
                let key = dir.join("key.pem");
                if !cert.exists() || !key.exists() {
                    create_self_signed(&dir, &cert, &key)?;
                }
                Self::load(&cert, &key, true)
            }
        }
    }

    fn load(cert: &Path, key: &Path, self_signed: bool) -> Result<Self, TlsError> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Io { path: path.into(), source });
        let cert_pem = read(cert)?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Pem { path: cert.into(), message: e.to_string() })?;
        if chain.is_empty() {
            return Err(TlsError::Empty { path: cert.into(), what: "certificate" });
        }
        let key_pem = read(key)?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| TlsError::Pem { path: key.into(), message: e.to_string() })?;
        Ok(TlsMaterial { chain, key: key_der, self_signed, cert_path: cert.into() })
    }

    /// A rustls server configuration offering HTTP/1.1 (WebSocket upgrades need it).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn create_self_signed(dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() && !names.iter().any(|n| n == host) {
            names.push(host.to_owned());
        }
    }
    let certified = rcgen::generate_simple_self_signed(names)?;
    std::fs::write(cert, certified.cert.pem()).map_err(io(cert))?;
    write_private(key, certified.signing_key.serialize_pem().as_bytes()).map_err(io(key))?;
    tracing::info!(path = %cert.display(), "made a self-signed certificate");
    Ok(())
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_is_made_once_and_kept() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir =
            std::env::temp_dir().join(format!("encore-tls-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = TlsMaterial::load_or_create(None, None, &dir).unwrap();
        assert!(first.self_signed);
        first.server_config().unwrap();
        let second = TlsMaterial::load_or_create(None, None, &dir).unwrap();
        assert_eq!(first.chain, second.chain, "the certificate is kept across starts");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("tls/key.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key is private");
        }
    }

    #[test]
    fn a_missing_or_empty_certificate_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("encore-tls-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = TlsMaterial::load_or_create(Some(&empty), Some(&empty), &dir).err().unwrap().to_string();
        assert!(err.contains("empty.pem") && err.contains("no PEM certificate"), "{err}");
        let missing = dir.join("missing.pem");
        let err = TlsMaterial::load_or_create(Some(&missing), Some(&missing), &dir).err().unwrap().to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
