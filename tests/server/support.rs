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
    // Servers in this process share one recorder; the tests that read metrics run their own
    // server process (tests/server/metrics.rs).
    config.metrics.listen = None;
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

/// A free TCP port on loopback (released before use: a small race, as any test port has).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real `encore serve` process on loopback, with metrics on a port of its own; killed when
/// dropped if it still runs.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub base: String,
    pub tls: ClientTls,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub metrics: std::net::SocketAddr,
}

impl ServerProcess {
    /// Starts `encore serve` with `args` and `env` added, and waits until `/healthz` answers.
    pub async fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        Self::start_with(name, args, env, None, None).await
    }

    /// [`ServerProcess::start`] with a configuration file of `config` (TOML) and, when given,
    /// at most `max_files` open descriptors.
    pub async fn start_with(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        config: Option<&str>,
        max_files: Option<u64>,
    ) -> ServerProcess {
        use std::os::unix::process::CommandExt;
        let dir = temp_dir(name);
        let port = free_port();
        let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join("server.log");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_encore"));
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--workers", "2"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--metrics-listen", &metrics.to_string()])
            .args(args)
            .env("ENCORE_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(dir.join("server.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        if let Some(config) = config {
            let path = dir.join("encore.toml");
            std::fs::write(&path, format!("{config}\n")).unwrap();
            command.arg("--config").arg(path);
        }
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
        let mut child = command.spawn().expect("encore serve starts");
        let base = format!("https://127.0.0.1:{port}");
        let cert = dir.join("data/tls/cert.pem");
        for _ in 0..300 {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("encore serve exited ({status}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            if cert.exists()
                && let Ok(tls) = ClientTls::trusting(&cert)
                && encore::client::get(&tls, &format!("{base}/healthz"), None).await.is_ok_and(|(s, _)| s == 200)
            {
                return ServerProcess { child, base, tls, data_dir: dir.join("data"), log, metrics };
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let _ = child.kill();
        panic!("encore serve did not come up:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    pub async fn token(&self, uid: &str, role: &str) -> String {
        dev_token(&self.tls, &self.base, uid, role).await.expect("a dev token")
    }

    pub async fn client(&self, uid: &str, role: &str) -> Arc<Signaling> {
        let token = self.token(uid, role).await;
        Arc::new(Signaling::connect(&self.tls, &self.base, Some(&token), None).await.expect("a WebSocket session"))
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

    /// Sends a signal (`TERM`, `INT`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn exited(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The server's standard error (its log) so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics`: the scrape's text.
    pub async fn scrape(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics").await.expect("the metrics endpoint answers");
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET: the status and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    Ok((status, if chunked { dechunk(body) } else { body.to_owned() }))
}

/// The body of a chunked response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
