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

/// A real `encore serve` process on 127.0.0.1, configured by a TOML text, its log in a file.
pub struct ServerProcess {
    child: std::process::Child,
    pub base: String,
    pub tls: ClientTls,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts the server binary with `config` (TOML, added to loopback-only media on one
    /// worker) and, when given, at most `max_files` open descriptors; waits until it answers.
    pub async fn start(name: &str, config: &str, max_files: Option<u64>) -> ServerProcess {
        use std::os::unix::process::CommandExt;
        let dir = temp_dir(name);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config_path = dir.join("encore.toml");
        std::fs::write(&config_path, format!("{config}\n")).unwrap();
        let log = dir.join("server.log");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_encore"));
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--workers", "1", "--config"])
            .arg(&config_path)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("ENCORE_BIND_IP", "127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(limit) = max_files {
            // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("the server binary starts");
        let base = format!("https://127.0.0.1:{port}");
        let cert = dir.join("data/tls/cert.pem");
        for _ in 0..300 {
            if cert.exists()
                && let Ok(tls) = ClientTls::trusting(&cert)
                && encore::client::get(&tls, &format!("{base}/healthz"), None)
                    .await
                    .is_ok_and(|(status, _)| status == 200)
            {
                return ServerProcess { child, base, tls, log };
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the server did not come up; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn token(&self, uid: &str, role: &str) -> String {
        dev_token(&self.tls, &self.base, uid, role).await.expect("a dev token")
    }

    pub async fn client(&self, uid: &str, role: &str) -> Arc<Signaling> {
        let token = self.token(uid, role).await;
        Arc::new(Signaling::connect(&self.tls, &self.base, Some(&token), None).await.expect("a WebSocket session"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
