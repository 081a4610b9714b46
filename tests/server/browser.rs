//! The real-browser test: a real `encore serve` process and two headless Chromium instances
//! (Debian's chromium, driven by playwright-core from npm) running the demo page.
//!
//! `scripts/browser-deps.sh` installs what is missing (chromium, espeak-ng, sox, playwright-core)
//! and prints where it is; `tests/browser/demo.mjs` does the browser part: page A signs in as a
//! speaker and publishes a speech WAV made with espeak-ng (Chromium's fake audio capture), page B
//! signs in as a listener; B's `getStats()` must show inbound audio packets with
//! `totalAudioEnergy > 0`, and B's page must show A's utterance as now playing. B pauses for
//! 1.5 s while A talks and resumes: its browser must count no audio packet lost. Then B (a
//! moderator) mutes A and lifts it again from its page; then the script asks this harness to
//! restart the server (`ACTION restart-server` on its output: the process is killed and started
//! again on the same port and data folder, and the file named by `ENCORE_RESTART_ACK` is written
//! when it is up), and both pages must reconnect by themselves and B hear A again; then again
//! with the data folder's dev signing key gone (`ACTION restart-server-new-key`: the pages'
//! tokens are refused, so they must get fresh ones and carry on, signed in); then B's page is
//! reloaded and must come back signed in, in the room, listening; last, a third restart while
//! A's ticket requests are answered 503 (A keeps trying, signed in), then 401 (A signs out).
//!
//! The second test puts Firefox in the room too (Debian's firefox-esr, driven by puppeteer-core over
//! WebDriver BiDi; `tests/browser/firefox.mjs`): a Firefox listener hears a Chromium speaker, and a
//! Chromium listener hears Firefox's fake microphone.
//!
//! Run them alone with `cargo test --test tests server::browser -- --nocapture`. Set
//! `ENCORE_SKIP_BROWSER_TEST=1` to skip both on a machine that cannot install packages (they say so
//! loudly); CI does not set it. They run one at a time (each starts browsers enough to keep two
//! cores busy, and each runs `scripts/browser-deps.sh`, whose apt and npm must not race).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;

/// How long the server may take to answer /healthz (a debug build making its key and certificate).
const SERVER_START: Duration = Duration::from_secs(90);
/// The browser script's own timeout (seconds); it stops itself at this plus 30 s.
const BROWSER_TIMEOUT_S: u64 = 180;
/// firefox.mjs's own timeout (seconds): it passes in about 10 s on an idle machine.
const FIREFOX_TIMEOUT_S: u64 = 90;

/// Held by a browser test for its whole run: the browser tests go one at a time.
static BROWSER_TESTS: Mutex<()> = Mutex::new(());

/// Waits for the other browser test to finish (a failed one, which panicked holding it, too).
fn one_browser_test_at_a_time() -> MutexGuard<'static, ()> {
    BROWSER_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// True (and says so) when `ENCORE_SKIP_BROWSER_TEST` asks to skip the real-browser tests.
fn skip_browser_test(which: &str) -> bool {
    let skip = std::env::var_os("ENCORE_SKIP_BROWSER_TEST").is_some_and(|v| !v.is_empty() && v != "0");
    if skip {
        eprintln!("SKIPPED: {which} (ENCORE_SKIP_BROWSER_TEST is set)");
    }
    skip
}

#[test]
fn demo_page_speaker_to_listener_in_real_chromium() {
    if skip_browser_test("the real-browser test") {
        return;
    }
    let _one = one_browser_test_at_a_time();
    let mut run = BrowserRun::start("encore-browser-test");
    let restart_ack = run.work.path().join("restarted");
    let mut restarted_logs: Vec<PathBuf> = Vec::new();
    let mut command = run.node_command(
        "tests/browser/demo.mjs",
        BROWSER_TIMEOUT_S,
        &["CHROMIUM", "PLAYWRIGHT_CORE", "ESPEAK_NG", "SOX"],
    );
    command.env("ENCORE_RESTART_ACK", &restart_ack);
    let script_log = run.work.path().join("demo.log");
    // The script's one request of the harness: a restart of the server under its pages, as a
    // deploy would do it (killed, then started again with the same data folder: its TLS
    // certificate and dev signing key, so the pages' tokens still verify).
    // With `-new-key`, the dev signing key goes too (a data folder lost): every token the pages
    // hold is refused, as after a key rotation. The acknowledgement has a line per restart.
    let restart = |line: &str| {
        let new_key = match line.trim() {
            "ACTION restart-server" => false,
            "ACTION restart-server-new-key" => true,
            _ => return,
        };
        eprintln!("browser test: restarting the server{}", if new_key { " with a new dev signing key" } else { "" });
        run.server.stop();
        if new_key {
            fs::remove_file(run.data_dir.join(encore::auth::DEV_KEY_FILE)).expect("the dev signing key was kept");
        }
        let log = run.work.path().join(format!("server-restarted-{}.log", restarted_logs.len() + 1));
        run.server = Server::start(&run.addr, &run.data_dir, &log);
        wait_until_healthy(&run.addr, &mut run.server, &log);
        restarted_logs.push(log);
        fs::write(&restart_ack, "up\n".repeat(restarted_logs.len())).expect("the restart acknowledgement");
        eprintln!("browser test: the server is up again");
    };
    let (status, output) = run_logged(command, &script_log, Duration::from_secs(BROWSER_TIMEOUT_S + 60), restart);

    let Some(result) = passed_result(status, &output) else {
        let restarted: String = restarted_logs
            .iter()
            .map(|log| format!("\n--- {} (last 100 lines) ---\n{}", log.display(), tail(log, 100)))
            .collect();
        panic!(
            "the browser test failed (exit {status:?})\n--- demo.mjs ---\n{output}\n--- server log (last 150 lines) ---\n{}{restarted}",
            tail(&run.server_log, 150),
        );
    };
    let audio = &result["inbound_audio"];
    let packets = audio["packetsReceived"].as_u64().unwrap_or(0);
    let energy = audio["totalAudioEnergy"].as_f64().unwrap_or(0.0);
    let peer_a = result["peer_a"].as_str().unwrap_or_default().to_owned();
    let now_playing = result["now_playing"]["utterance"].as_str().unwrap_or_default().to_owned();
    eprintln!(
        "browser test: B received {packets} audio packets, totalAudioEnergy {energy:.4}; now playing {now_playing} \
         ({}s after Talk); A sent {} packets",
        result["now_playing"]["after_s"], result["outbound_audio_packets"]
    );
    // The script checked these; say them again here so a changed script cannot pass silently.
    assert!(packets > 0, "no inbound audio packets: {result}");
    assert!(energy > 0.0, "inbound audio decoded no energy: {result}");
    assert!(
        now_playing.strip_prefix(&format!("{peer_a}#")).is_some_and(|n| n.parse::<u32>().is_ok()),
        "B's now playing {now_playing:?} is not an utterance of A ({peer_a:?})"
    );
    let reconnected = &result["reconnected"];
    eprintln!(
        "browser test: after the restart B heard A again {}s after the restart began ({} packets); after a reload {}s",
        reconnected["heard_again_after_s"], reconnected["packets"], result["reloaded"]["heard_again_after_s"]
    );
    assert!(reconnected["packets"].as_u64().unwrap_or(0) > 0, "B did not hear A after the restart: {result}");
    let new_key = &result["new_key"];
    eprintln!(
        "browser test: after a restart with a new signing key both pages reconnected signed in ({}), B heard A again {}s after",
        new_key["signed_in_as"], new_key["heard_again_after_s"]
    );
    assert!(new_key["packets"].as_u64().unwrap_or(0) > 0, "B did not hear A after the key changed: {result}");
    // A third restart with A's ticket requests answered 503, then 401: A waited the 503s out,
    // signed in, and signed out on the refused token, saying why.
    let refused = result["refused"]["error"].as_str().unwrap_or_default();
    eprintln!("browser test: A signed out only when its token was refused: {refused:?}");
    assert!(refused.contains("refused"), "A did not sign out on a refused token: {result}");
}

#[test]
fn firefox_and_chromium_hear_each_other() {
    if skip_browser_test("the Firefox and Chromium test") {
        return;
    }
    let _one = one_browser_test_at_a_time();
    let run = BrowserRun::start("encore-firefox-test");
    let command = run.node_command(
        "tests/browser/firefox.mjs",
        FIREFOX_TIMEOUT_S,
        &["CHROMIUM", "PLAYWRIGHT_CORE", "FIREFOX", "PUPPETEER_CORE", "ESPEAK_NG", "SOX"],
    );
    // The script's output holds Firefox's own stdout and stderr (puppeteer's dumpio) and, on a
    // failure, Chromium's and both pages' consoles: all of it goes in the panic below.
    let script_log = run.work.path().join("firefox.log");
    let (status, output) = run_logged(command, &script_log, Duration::from_secs(FIREFOX_TIMEOUT_S + 60), |_| {});
    let Some(result) = passed_result(status, &output) else {
        panic!(
            "the Firefox and Chromium test failed (exit {status:?})\n--- firefox.mjs ---\n{output}\n--- server log (last 150 lines) ---\n{}",
            tail(&run.server_log, 150),
        );
    };
    // The script checked these; say them again here so a changed script cannot pass silently.
    for (listener, heard, speaker) in
        [("Firefox", "firefox_hears_chromium", "peer_chromium"), ("Chromium", "chromium_hears_firefox", "peer_firefox")]
    {
        let heard = &result[heard];
        let packets = heard["audio"]["packetsReceived"].as_u64().unwrap_or(0);
        let first = heard["first"]["packets"].as_u64().unwrap_or(u64::MAX);
        let bytes = heard["audio"]["bytesReceived"].as_u64().unwrap_or(0);
        let energy = heard["audio"]["totalAudioEnergy"].as_f64().unwrap_or(0.0);
        let now_playing = heard["now_playing"]["utterance"].as_str().unwrap_or_default();
        let speaker = result[speaker].as_str().unwrap_or_default();
        eprintln!(
            "browser test: {listener} received {packets} audio packets ({bytes} bytes), totalAudioEnergy {energy:.4}; \
             now playing {now_playing} {}s after {speaker} began; its meter of {speaker} reached {}",
            heard["now_playing"]["after_s"], heard["max_level"]
        );
        assert!(packets > first, "{listener}'s inbound audio did not rise: {result}");
        assert!(energy > 0.0, "{listener} decoded no audio energy: {result}");
        assert!(
            now_playing.strip_prefix(&format!("{speaker}#")).is_some_and(|n| n.parse::<u32>().is_ok()),
            "{listener}'s now playing {now_playing:?} is not an utterance of {speaker:?}"
        );
    }
    eprintln!(
        "browser test: Chromium {} and {} heard each other in {}s",
        result["chromium"].as_str().unwrap_or("?"),
        result["firefox"].as_str().unwrap_or("?"),
        result["elapsed_s"]
    );
}

/// What each browser test starts with: what scripts/browser-deps.sh found, a temporary folder, and
/// a real `encore serve` on a free loopback port (its data folder and log in that folder) that
/// answers /healthz.
struct BrowserRun {
    // Before `work`: fields drop in order, and the server goes before its folder does.
    server: Server,
    work: TempDir,
    root: &'static Path,
    deps: HashMap<String, String>,
    addr: SocketAddr,
    data_dir: PathBuf,
    server_log: PathBuf,
}

impl BrowserRun {
    fn start(temp_prefix: &str) -> BrowserRun {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let deps = browser_deps(root);
        let work = TempDir::new(temp_prefix);
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let data_dir = work.path().join("data");
        fs::create_dir_all(&data_dir).expect("data dir");
        let server_log = work.path().join("server.log");
        let mut server = Server::start(&addr, &data_dir, &server_log);
        wait_until_healthy(&addr, &mut server, &server_log);
        BrowserRun { server, work, root, deps, addr, data_dir, server_log }
    }

    /// `node SCRIPT https://ADDR --timeout TIMEOUT_S` in the repository, with the `env` paths
    /// browser-deps.sh printed.
    fn node_command(&self, script: &str, timeout_s: u64, env: &[&str]) -> Command {
        let url = format!("https://{}", self.addr);
        eprintln!("browser test: server up at {url}; running {script}");
        let node = self.deps.get("NODE").map(String::as_str).unwrap_or("node");
        let mut command = Command::new(node);
        command
            .current_dir(self.root)
            .arg(script)
            .arg(&url)
            .args(["--timeout", &timeout_s.to_string()])
            .stdin(Stdio::null());
        for key in env {
            if let Some(value) = self.deps.get(*key) {
                command.env(key, value);
            }
        }
        command
    }
}

/// The script's `RESULT {json}` (its last) when it passed: exit 0 and `"ok": true`.
fn passed_result(status: Option<i32>, output: &str) -> Option<Value> {
    let result = output
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("RESULT "))
        .and_then(|json| serde_json::from_str::<Value>(json).ok())?;
    (status == Some(0) && result["ok"] == Value::Bool(true)).then_some(result)
}

/// Runs scripts/browser-deps.sh and reads its `KEY=VALUE` lines.
fn browser_deps(root: &Path) -> HashMap<String, String> {
    let output = Command::new("bash")
        .arg(root.join("scripts/browser-deps.sh"))
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/browser-deps.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scripts/browser-deps.sh failed ({}); it installs chromium, firefox-esr, espeak-ng and sox with apt-get \
         (root) and playwright-core and puppeteer-core with npm. Set ENCORE_SKIP_BROWSER_TEST=1 to skip this test where that is impossible.\n{stderr}",
        output.status
    );
    let deps: HashMap<String, String> = stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    eprintln!(
        "browser test: {} with playwright-core at {}; {} with puppeteer-core at {}",
        deps.get("CHROMIUM_VERSION").map(String::as_str).unwrap_or("chromium"),
        deps.get("PLAYWRIGHT_CORE").map(String::as_str).unwrap_or("?"),
        deps.get("FIREFOX_VERSION").map(String::as_str).unwrap_or("firefox"),
        deps.get("PUPPETEER_CORE").map(String::as_str).unwrap_or("?")
    );
    deps
}

/// A port that was free a moment ago (the server binds it right after; a race is unlikely on
/// loopback and would show as a clear start failure).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// The `encore serve` child process, killed when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn start(addr: &SocketAddr, data_dir: &Path, log: &Path) -> Server {
        let log_file = File::create(log).expect("server log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_encore"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command.spawn().expect("start encore serve");
        Server { child }
    }
}

impl Server {
    /// Kills it (no drain: as a crash or a hard restart would) and waits for it to be gone.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_until_healthy(addr: &SocketAddr, server: &mut Server, log: &Path) {
    let deadline = Instant::now() + SERVER_START;
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("encore serve exited ({status}) before answering /healthz\n--- server log ---\n{}", tail(log, 100));
        }
        let last = match https_get(addr, "/healthz") {
            Ok((200, _)) => break,
            Ok((status, body)) => format!("HTTP {status}: {body}"),
            Err(error) => error,
        };
        if Instant::now() > deadline {
            panic!(
                "encore serve did not answer GET /healthz within {SERVER_START:?} (last: {last})\n--- server log ---\n{}",
                tail(log, 100)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Ready for traffic (dev mode fetches its own /dev/keys); a server without /readyz is fine too.
    while Instant::now() < deadline {
        match https_get(addr, "/readyz") {
            Ok((200, _)) | Ok((404, _)) => return,
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A plain HTTP/1.1 GET over TLS that accepts the server's self-signed certificate.
fn https_get(addr: &SocketAddr, path: &str) -> Result<(u16, String), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.signature_verification_algorithms)))
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("a valid name");
    let connection = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect_timeout(addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // A server may close without close_notify; what was read still counts.
    if let Err(error) = tls.read_to_end(&mut response)
        && response.is_empty()
    {
        return Err(error.to_string());
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:.200}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Accepts any certificate (the server's is self-signed) but still checks the handshake signatures.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Runs `command` with its output teed to `log` (and to this test's stderr), killing it after
/// `limit`; each line it prints that starts with `ACTION ` goes to `on_action` as it comes.
/// Returns its exit code and everything it printed.
fn run_logged(
    mut command: Command,
    log: &Path,
    limit: Duration,
    mut on_action: impl FnMut(&str),
) -> (Option<i32>, String) {
    let file = File::create(log).expect("script log");
    command.stdout(file.try_clone().expect("log fd")).stderr(file);
    let mut child = command.spawn().expect("run node (scripts/browser-deps.sh installs it with npm)");
    let deadline = Instant::now() + limit;
    let mut acted = 0;
    let status = loop {
        let printed = fs::read_to_string(log).unwrap_or_default();
        let actions: Vec<&str> = printed.lines().filter(|line| line.starts_with("ACTION ")).collect();
        for action in &actions[acted.min(actions.len())..] {
            on_action(action);
        }
        acted = actions.len();
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(error) => panic!("waiting for node: {error}"),
        }
    };
    let output = fs::read_to_string(log).unwrap_or_default();
    eprintln!("{output}");
    (status, output)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A temporary directory removed when dropped (kept when `ENCORE_KEEP_TEMP` is set).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("ENCORE_KEEP_TEMP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept {}", self.0.display());
        }
    }
}
