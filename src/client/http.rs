//! HTTPS calls of the client: tokens in dev mode, tickets.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::error::ClientError;
use super::tls::ClientTls;

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
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::Http { url: url.to_owned(), source };
    let request = request.body(Full::new(body)).map_err(|e| failed(e.into()))?;
    let response = client.request(request).await.map_err(|e| failed(e.into()))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| failed(e.into()))?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

async fn post(tls: &ClientTls, url: &str, bearer: Option<&str>, body: Value) -> Result<Value, ClientError> {
    let (status, value) = request(tls, hyper::Method::POST, url, bearer, Some(body)).await?;
    if !(200..300).contains(&status) {
        return Err(ClientError::HttpStatus { url: url.to_owned(), status, body: value.to_string() });
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
    value["idToken"].as_str().map(str::to_owned).ok_or_else(|| ClientError::Protocol("no idToken in the answer".into()))
}

/// A single-use WebSocket ticket (`POST /api/ws-ticket`).
pub async fn ws_ticket(tls: &ClientTls, base: &str, token: &str) -> Result<String, ClientError> {
    let value = post(tls, &format!("{base}/api/ws-ticket"), Some(token), json!({})).await?;
    value["ticket"].as_str().map(str::to_owned).ok_or_else(|| ClientError::Protocol("no ticket in the answer".into()))
}
