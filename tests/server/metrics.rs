//! `GET /metrics` of a real `encore serve` process under a small load (the load generator:
//! speakers with talk-spurts and video, listeners): every family is there from the start, the
//! gauges follow the room while it runs and return to zero when it empties, the counters move,
//! and Debian's `promtool check metrics` has nothing to say about the text.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use encore::loadgen::{LoadgenOptions, run};
use encore::metrics::{FAMILIES, PROCESS_FAMILIES};

use super::support::ServerProcess;

/// Every sample of a scrape, by its series (`name{labels}`).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of a family's series whose labels contain every one of `labels` (`key="value"`).
fn sum(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (family, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            family == name && labels.iter().all(|label| rest.contains(label))
        })
        .map(|(_, value)| value)
        .sum()
}

/// `promtool` from Debian's `prometheus` package; the test fails rather than skips without it.
fn promtool() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join("promtool")).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "promtool is not on PATH: install Debian's `prometheus` package (apt-get install prometheus); .ci/run does"
        )
    })
}

fn promtool_check(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scrape_under_load_has_every_family_moving_counters_and_passes_promtool() {
    let server = ServerProcess::start("metrics", &[], &[]).await;

    // Before any room: every family, with its help and type, and promtool is content.
    let idle = server.scrape().await;
    for family in FAMILIES.iter().chain(PROCESS_FAMILIES) {
        assert!(idle.contains(&format!("# HELP {} ", family.name)), "no {} in:\n{idle}", family.name);
        assert!(idle.contains(&format!("# TYPE {} ", family.name)), "no TYPE of {}", family.name);
    }
    promtool_check(&idle);
    let before = samples(&idle);
    assert_eq!(sum(&before, "encore_rooms", &[]), 0.0);
    assert!(sum(&before, "encore_worker_rooms", &["worker=\"1\""]) == 0.0, "a series per worker");

    // A small load: 2 speakers (audio and video) and 3 listeners for 4 s, watched every 250 ms.
    let mut options = LoadgenOptions::new(server.base.clone(), 2, 3, 4.0);
    options.room = "metrics".into();
    options.video = true;
    options.drain = Duration::from_millis(1000);
    let load = tokio::spawn(run(options, server.tls.clone()));
    let mut peaks: BTreeMap<&str, f64> = BTreeMap::new();
    let watched: [(&str, &str, &[&str]); 9] = [
        ("rooms", "encore_rooms", &[]),
        ("speakers", "encore_peers", &["role=\"speaker\""]),
        ("listener peers", "encore_peers", &["role=\"listener\""]),
        ("sessions", "encore_sessions", &[]),
        ("publishers", "encore_publishers", &[]),
        ("listeners", "encore_listeners", &[]),
        ("connected", "encore_transports", &["state=\"connected\""]),
        ("playing", "encore_engine_listeners_playing", &[]),
        ("buffer", "encore_engine_buffer_bytes", &[]),
    ];
    while !load.is_finished() {
        let now = samples(&server.scrape().await);
        for (what, name, labels) in &watched {
            let peak = peaks.entry(what).or_insert(0.0);
            *peak = peak.max(sum(&now, name, labels));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let report = load.await.unwrap().expect("the load generator runs");
    assert_eq!((report.speakers_connected, report.listeners_connected), (2, 3), "{report}");
    println!("peaks while loaded: {peaks:?}");
    for (what, expected) in [
        ("rooms", 1.0),
        ("speakers", 2.0),
        ("listener peers", 3.0),
        ("sessions", 5.0),
        ("publishers", 2.0),
        ("listeners", 3.0),
        ("connected", 5.0),
    ] {
        assert_eq!(peaks[what], expected, "{what}: {peaks:?}");
    }
    assert!(peaks["playing"] >= 1.0 && peaks["buffer"] > 0.0, "{peaks:?}");

    // When everyone has gone, the room closes and every gauge it added to is back at zero.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = server.scrape().await;
        let now = samples(&text);
        let left: f64 = ["encore_rooms", "encore_peers", "encore_sessions", "encore_transports", "encore_publishers"]
            .iter()
            .map(|name| sum(&now, name, &[]))
            .sum();
        if left == 0.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after = samples(&text);
    for name in [
        "encore_rooms",
        "encore_peers",
        "encore_sessions",
        "encore_transports",
        "encore_publishers",
        "encore_listeners",
        "encore_engine_listeners_playing",
        "encore_engine_buffer_bytes",
        "encore_engine_buffer_cap_bytes",
        "encore_engine_utterances_open",
        "encore_engine_utterances_buffered",
        "encore_worker_rooms",
    ] {
        assert_eq!(sum(&after, name, &[]), 0.0, "{name} after the room closed:\n{text}");
    }

    // What moved, and by how much at least.
    let moved = |name: &str, labels: &[&str]| sum(&after, name, labels) - sum(&before, name, labels);
    let expectations: Vec<(&str, &[&str], f64)> = vec![
        ("encore_rooms_created_total", &[], 1.0),
        ("encore_rtp_packets_total", &["direction=\"in\"", "media=\"audio\""], 200.0),
        ("encore_rtp_packets_total", &["direction=\"in\"", "media=\"video\""], 1.0),
        ("encore_rtp_bytes_total", &["direction=\"in\""], 10_000.0),
        ("encore_rtp_packets_total", &["direction=\"out\"", "media=\"audio\""], 50.0),
        ("encore_rtp_bytes_total", &["direction=\"out\""], 1_000.0),
        ("encore_rtcp_plis_total", &["direction=\"out\""], 1.0),
        ("encore_rtcp_receiver_reports_total", &[], 1.0),
        ("encore_listener_loss_ratio_count", &[], 1.0),
        ("encore_listener_jitter_seconds_count", &[], 1.0),
        ("encore_join_latency_seconds_count", &[], 1.0),
        ("encore_signaling_requests_total", &["type=\"join\"", "result=\"ok\""], 5.0),
        ("encore_signaling_requests_total", &["type=\"publish\"", "result=\"ok\""], 2.0),
        ("encore_signaling_requests_total", &["type=\"listen\"", "result=\"ok\""], 3.0),
        ("encore_signaling_notices_total", &["type=\"now_playing\""], 1.0),
        ("encore_sessions_closed_total", &[], 5.0),
        ("encore_auth_verifications_total", &["result=\"ok\""], 5.0),
        ("encore_auth_key_fetches_total", &["result=\"ok\""], 1.0),
        ("encore_transport_state_changes_total", &["state=\"connected\""], 5.0),
        ("encore_worker_ticks_total", &[], 100.0),
        ("encore_worker_tick_duration_seconds_count", &[], 100.0),
        ("encore_engine_utterances_started_total", &[], 1.0),
        ("encore_engine_route_changes_total", &[], 1.0),
        ("encore_engine_decisions_total", &[], 1.0),
        ("encore_engine_decisions_per_tick_count", &[], 1.0),
        ("encore_engine_listener_lag_seconds_count", &[], 1.0),
        ("encore_engine_packets_total", &["kind=\"sent\""], 50.0),
        ("process_cpu_seconds_total", &[], 0.01),
    ];
    for (name, labels, at_least) in expectations {
        let delta = moved(name, labels);
        assert!(delta >= at_least, "{name}{labels:?} moved by {delta}, expected at least {at_least}");
    }
    assert!(sum(&after, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(sum(&after, "process_open_fds", &[]) > 3.0);
    let retransmitted = moved("encore_rtp_retransmitted_packets_total", &[]);
    let dropped = moved("encore_worker_media_dropped_total", &[]) + moved("encore_worker_commands_dropped_total", &[]);
    println!(
        "scrape: {} bytes, {} series; retransmitted {retransmitted}, dropped {dropped}; join latency sum {:.3} s over {} listeners",
        text.len(),
        after.len(),
        sum(&after, "encore_join_latency_seconds_sum", &[]),
        sum(&after, "encore_join_latency_seconds_count", &[])
    );
    promtool_check(&text);

    // The same life in the log, as structured events at info.
    let log = server.log_text();
    for event in [
        "room created",
        "peer joined",
        "transport connected",
        "track published",
        "listening started",
        "track unpublished",
        "listening stopped",
        "peer left",
        "room closed",
    ] {
        assert!(log.contains(event), "no {event:?} in the log:\n{log}");
    }
}

/// The endpoint is off with an empty address, and its address is refused when taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_is_off_with_an_empty_address() {
    use encore::config::ServerConfig;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = ServerConfig::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.data_dir = super::support::temp_dir("metrics-taken").join("data");
    config.metrics.listen = Some(taken.local_addr().unwrap());
    let error = encore::server::start(config.clone(), Default::default()).await.err().expect("the address is taken");
    assert!(error.to_string().contains(&taken.local_addr().unwrap().to_string()), "{error}");

    config.metrics.listen = None;
    let server = encore::server::start(config, Default::default()).await.expect("the server starts");
    assert_eq!(server.metrics_addr, None);
    server.shutdown().await;
}

/// `encore healthcheck`, the container's health check: green against the running server (it
/// finds the port in the configuration and trusts exactly the server's certificate), red once
/// the server is gone, and red against a server with another certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_command_is_green_while_the_server_answers() {
    let mut server = ServerProcess::start("healthcheck", &[], &[]).await;
    let port = server.base.rsplit(':').next().unwrap().to_owned();
    let check = |data_dir: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_encore"))
            .args(["healthcheck", "--timeout-s", "3", "--data-dir"])
            .arg(data_dir)
            .env("ENCORE_LISTEN", format!("0.0.0.0:{port}"))
            .output()
            .expect("encore healthcheck runs")
    };
    let green = check(&server.data_dir);
    assert!(green.status.success(), "{}", String::from_utf8_lossy(&green.stderr));
    assert!(String::from_utf8_lossy(&green.stdout).contains("\"ok\""));

    let stranger = super::support::temp_dir("healthcheck-other").join("data");
    encore::server::tls::TlsMaterial::load_or_create(None, None, &stranger).unwrap();
    let red = check(&stranger);
    assert!(!red.status.success(), "another certificate is not this server");

    server.signal("TERM");
    assert!(server.exited(Duration::from_secs(10)).await.is_some_and(|s| s.success()));
    let red = check(&server.data_dir);
    assert!(!red.status.success(), "nobody answers");
    assert!(String::from_utf8_lossy(&red.stderr).contains("healthz"), "{}", String::from_utf8_lossy(&red.stderr));
}
