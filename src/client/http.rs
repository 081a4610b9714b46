//! HTTPS calls of the client: tokens in dev mode, tickets; and the TLS trust it uses.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde_json::{Value, json};

use super::signaling::ClientError;

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
        let pem = std::fs::read(cert_pem).map_err(|e| ClientError::Tls(format!("{}: {e}", cert_pem.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ClientError::Tls(e.to_string()))?;
            roots.add(cert).map_err(|e| ClientError::Tls(e.to_string()))?;
        }
        Ok(ClientTls { config: Arc::new(Self::builder().with_root_certificates(roots).with_no_client_auth()) })
    }

    /// The public web roots (a server with a real certificate).
    pub fn webpki() -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        ClientTls { config: Arc::new(Self::builder().with_root_certificates(roots).with_no_client_auth()) }
    }
}

/// One request: the status and the body as JSON (null when it is not JSON).
async fn request(
    tls: &ClientTls,
    method: hyper::Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value), ClientError> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls.config).clone())
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let mut request = Request::builder().method(method).uri(url);
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    let request = request.body(Full::new(body)).map_err(|e| ClientError::Http(e.to_string()))?;
    let response = client.request(request).await.map_err(|e| ClientError::Http(e.to_string()))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| ClientError::Http(e.to_string()))?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

async fn post(tls: &ClientTls, url: &str, bearer: Option<&str>, body: Value) -> Result<Value, ClientError> {
    let (status, value) = request(tls, hyper::Method::POST, url, bearer, Some(body)).await?;
    if !(200..300).contains(&status) {
        return Err(ClientError::Http(format!("{url}: {status}: {value}")));
    }
    Ok(value)
}

/// `GET url`: the status and the body as JSON (null when it is not JSON).
pub async fn get(tls: &ClientTls, url: &str, bearer: Option<&str>) -> Result<(u16, Value), ClientError> {
    request(tls, hyper::Method::GET, url, bearer, None).await
}

/// `PUT url` with a JSON body: the status and the body as JSON (null when it is not JSON).
pub async fn put(tls: &ClientTls, url: &str, bearer: Option<&str>, body: Value) -> Result<(u16, Value), ClientError> {
    request(tls, hyper::Method::PUT, url, bearer, Some(body)).await
}

/// A token from a dev-mode server (`POST /dev/token`).
pub async fn dev_token(tls: &ClientTls, base: &str, uid: &str, role: &str) -> Result<String, ClientError> {
    let value = post(tls, &format!("{base}/dev/token"), None, json!({"uid": uid, "role": role})).await?;
    value["idToken"].as_str().map(str::to_owned).ok_or_else(|| ClientError::Http("no idToken in the answer".into()))
}

/// A single-use WebSocket ticket (`POST /api/ws-ticket`).
pub async fn ws_ticket(tls: &ClientTls, base: &str, token: &str) -> Result<String, ClientError> {
    let value = post(tls, &format!("{base}/api/ws-ticket"), Some(token), json!({})).await?;
    value["ticket"].as_str().map(str::to_owned).ok_or_else(|| ClientError::Http("no ticket in the answer".into()))
}
