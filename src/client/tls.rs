//! Whom the client trusts: the server's own self-signed certificate, the public web roots,
//! or (load tests on one's own machine only) anything.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, pem::PemObject};

use super::error::ClientError;

/// Whom the client trusts.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    fn builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
    }

    /// Trusts exactly the certificates in this PEM file (the server's self-signed one).
    pub fn trusting(cert_pem: &std::path::Path) -> Result<Self, ClientError> {
        let pem = std::fs::read(cert_pem)
            .map_err(|source| ClientError::Io { context: format!("reading {}", cert_pem.display()), source })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ClientError::tls("reading the certificate PEM", e))?;
            roots.add(cert).map_err(|e| ClientError::tls("trusting the certificate", e))?;
        }
        Ok(ClientTls { config: Arc::new(Self::builder().with_root_certificates(roots).with_no_client_auth()) })
    }

    /// Trusts a server that presents exactly the first certificate of this PEM file, whatever
    /// name it is reached by and whatever its dates: for a server checking itself over
    /// loopback (`encore healthcheck`), where a real certificate's name does not match
    /// 127.0.0.1. Handshake signatures are checked as usual, so only the holder of that
    /// certificate's key passes.
    pub fn pinned(cert_pem: &std::path::Path) -> Result<Self, ClientError> {
        let pem = std::fs::read(cert_pem)
            .map_err(|source| ClientError::Io { context: format!("reading {}", cert_pem.display()), source })?;
        let cert = CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| ClientError::Protocol(format!("no certificate in {}", cert_pem.display())))?
            .map_err(|e| ClientError::tls("reading the certificate PEM", e))?;
        Ok(Self::pinned_der(cert.to_vec()))
    }

    /// [`ClientTls::pinned`] with the certificate as DER bytes (a relay origin's, which an
    /// edge is given rather than reading a file).
    pub fn pinned_der(der: Vec<u8>) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(CertificateCheck { accept: Accept::Only(der), provider: provider.clone() });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        ClientTls { config: Arc::new(config) }
    }

    /// The public web roots (a server with a real certificate).
    pub fn webpki() -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        ClientTls { config: Arc::new(Self::builder().with_root_certificates(roots).with_no_client_auth()) }
    }
}

/// How a client (the load generator, say) trusts the server's HTTPS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// The public web roots (a server with a real certificate).
    Webpki,
    /// Exactly the certificates of this PEM file (the server's self-signed one,
    /// `<data-dir>/tls/cert.pem`).
    Cert(PathBuf),
    /// Any certificate at all. For tests and benchmarks on your own machine only.
    Insecure,
}

impl TlsTrust {
    pub fn client_tls(&self) -> Result<ClientTls, ClientError> {
        match self {
            TlsTrust::Webpki => Ok(ClientTls::webpki()),
            TlsTrust::Cert(path) => ClientTls::trusting(path),
            TlsTrust::Insecure => Ok(insecure_tls()),
        }
    }
}

/// TEST ONLY: a TLS client configuration that accepts any server certificate (the handshake
/// signatures are still checked, the certificate's identity is not). It exists so that the load
/// generator can run against a server whose self-signed certificate file is not at hand; it
/// gives no protection against an active attacker and must never be used for anything else.
pub fn insecure_tls() -> ClientTls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(CertificateCheck { accept: Accept::Any, provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    ClientTls { config: Arc::new(config) }
}

/// A server-certificate check that is not a CA's: the handshake signatures are checked with the
/// provider's algorithms, the certificate by [`Accept`].
#[derive(Debug)]
struct CertificateCheck {
    accept: Accept,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

#[derive(Debug)]
enum Accept {
    /// TEST ONLY (see [`insecure_tls`]): every server certificate.
    Any,
    /// Exactly this end-entity certificate (DER; see [`ClientTls::pinned`]).
    Only(Vec<u8>),
}

impl rustls::client::danger::ServerCertVerifier for CertificateCheck {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match &self.accept {
            Accept::Only(der) if end_entity.as_ref() != der.as_slice() => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
            }
            _ => Ok(rustls::client::danger::ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;

    #[test]
    fn a_pinned_check_accepts_its_certificate_only_and_the_insecure_one_any() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let check = |accept| CertificateCheck { accept, provider: provider.clone() };
        let name = ServerName::try_from("localhost").expect("a name");
        let verify = |check: &CertificateCheck, der: &[u8]| {
            check.verify_server_cert(&CertificateDer::from(der.to_vec()), &[], &name, &[], UnixTime::now()).is_ok()
        };
        let pinned = check(Accept::Only(vec![1, 2, 3]));
        assert!(verify(&pinned, &[1, 2, 3]));
        assert!(!verify(&pinned, &[1, 2, 4]), "another certificate");
        assert!(verify(&check(Accept::Any), &[9, 9]));
    }
}
