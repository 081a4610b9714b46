//! The load generator's logic in-process against an in-process server: 2 speakers and 3
//! listeners for a few seconds. Checks that packets went both ways and that the report holds
//! together; no wall-clock thresholds (the machine is shared).

use std::time::Duration;

use encore::loadgen::{LoadgenOptions, process_cpu_seconds, report_json, run};

use super::support::start_server;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loadgen_two_speakers_three_listeners_reports_traffic() {
    let server = start_server("loadgen", |_| {}, None).await;
    let mut options = LoadgenOptions::new(server.base.clone(), 2, 3, 4.0);
    options.room = "smoke".into();
    options.drain = Duration::from_millis(1000);
    // The server runs in this process: its CPU is ours, which is enough to fill the fields.
    options.server_pid = Some(std::process::id());
    let report = run(options, server.tls.clone()).await.expect("the load generator runs");
    println!("{report}");

    assert_eq!((report.speakers_connected, report.listeners_connected, report.setup_failures), (2, 3, 0), "{report}");
    // 2 speakers for 4 s at 50 packets/s; timers may run a little late on a busy machine.
    assert!(report.sent_audio > 100, "{report}");
    assert!(report.sent_voiced > 0, "{report}");
    assert_eq!(report.send_errors, 0, "{report}");
    assert_eq!(report.sent_video, 0);
    // Speech was forwarded and every received audio packet carries the loadgen's stamp.
    assert!(report.received_audio > 0, "{report}");
    assert_eq!(report.received_video, 0);
    assert_eq!(report.unstamped, 0, "{report}");
    assert_eq!(report.delay_all.count, report.received_audio, "{report}");
    assert!(report.delay_live.count <= report.delay_all.count);
    // The path delay leaves out what a route sent of before it began (a live route's pre-roll).
    assert!(report.delay_live_less_lag.count <= report.delay_live.count);
    assert!(report.now_playing_notices > 0, "{report}");
    for d in [report.delay_all, report.delay_live, report.delay_live_less_lag] {
        assert!(d.p50_ms <= d.p90_ms && d.p90_ms <= d.p99_ms && d.p99_ms <= d.max_ms, "{d:?}");
    }
    assert!((0.0..=100.0).contains(&report.loss_percent));
    assert!(report.window_s > 0.0 && report.forwarded_per_s > 0.0);
    // CPU figures are present and consistent with each other.
    let cpu = report.server_cpu_s.expect("the server's CPU time");
    assert!(cpu >= 0.0);
    if cpu > 0.0 {
        let per = report.server_cpu_us_per_forwarded.expect("µs per packet");
        let forwarded = (report.received_audio + report.received_video) as f64;
        assert!((per * forwarded / 1e6 - cpu).abs() < 1e-6 * cpu.max(1.0));
        assert!(report.forwarded_per_server_core_s.is_some());
    }
    assert!(report.loadgen_cpu_s.is_some());
    assert!(process_cpu_seconds(None).is_some());

    // The text and JSON forms carry the same figures.
    let text = report.to_string();
    for line in ["sent ", "received ", "loss ", "delay all ", "delay live ", "server cpu ", "loadgen cpu "] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
    let json = report_json(&report);
    assert_eq!(json["received_audio"], report.received_audio);
    assert_eq!(json["delay_all"]["count"], report.delay_all.count);

    server.server.shutdown().await;
}
