//! A real server on loopback for tests, and clients that talk to it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use encore::auth::{DevIssuer, SharedClock, SystemClock};
use encore::client::{ClientTls, Signaling, dev_token};
use encore::config::ServerConfig;
use encore::server::{Server, StartOptions, start};

/// One RSA key for every test server (making one takes a moment).
fn dev_issuer() -> Arc<DevIssuer> {
    static ISSUER: OnceLock<Arc<DevIssuer>> = OnceLock::new();
    ISSUER.get_or_init(|| Arc::new(DevIssuer::generate(3600, Arc::new(SystemClock)).expect("an RSA key"))).clone()
}

pub struct TestServer {
    pub server: Server,
    pub base: String,
    pub tls: ClientTls,
    /// The server's data folder (its certificate, dev mode's role table).
    pub data_dir: PathBuf,
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "encore-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    dir
}

/// Starts a server on 127.0.0.1 with an ephemeral port, media on loopback only.
pub async fn start_server(
    name: &str,
    configure: impl FnOnce(&mut ServerConfig),
    clock: Option<SharedClock>,
) -> TestServer {
    let dir = temp_dir(name);
    let mut config = ServerConfig::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.data_dir = dir.join("data");
    config.server.workers = 2;
    config.media.bind_ip = "127.0.0.1".parse().unwrap();
    configure(&mut config);
    let server =
        start(config, StartOptions { clock, dev_issuer: Some(dev_issuer()) }).await.expect("the server starts");
    let tls = ClientTls::trusting(&dir.join("data/tls/cert.pem")).expect("the server's certificate");
    let base = server.url.clone();
    TestServer { server, base, tls, data_dir: dir.join("data") }
}

impl TestServer {
    pub async fn token(&self, uid: &str, role: &str) -> String {
        dev_token(&self.tls, &self.base, uid, role).await.expect("a dev token")
    }

    /// A connected signaling client with a dev token for `uid` and `role`.
    pub async fn client(&self, uid: &str, role: &str) -> Arc<Signaling> {
        let token = self.token(uid, role).await;
        Arc::new(Signaling::connect(&self.tls, &self.base, Some(&token), None).await.expect("a WebSocket session"))
    }
}
