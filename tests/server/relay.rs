//! The relay's connection on loopback (QUIC, src/relay/quic.rs): an origin serves its room's
//! relay log to two edges over real QUIC connections, and each edge runs the room as a
//! replica with its own audience. One edge loses its connection halfway and resumes from the
//! line it had got to. Their utterance events and buffers must equal the origin's tick by
//! tick. The room is generated and the origin's engine runs ahead of the network here (the
//! relay carries what the log holds, whatever its pace); the servers' origin and edge modes,
//! paced by the wall clock, are not built yet (docs/scaling.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use encore::Engine;
use encore::components::input::Input;
use encore::generate::generate_events;
use encore::relay::quic::{OriginLink, RelayOrigin};
use encore::relay::{OriginLog, Replica};

use crate::engine::replication::{edge_audience, options, run, utterance_events};

const SECRET: &str = "test-cluster-secret";

/// Serves `log` to every subscription of every edge, in chunks (as a live room's lines come).
fn serve(origin: Arc<RelayOrigin>, log: Arc<OriginLog>) {
    tokio::spawn(async move {
        while let Some(Ok(link)) = origin.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                while let Ok(mut stream) = link.next_subscription(SECRET).await {
                    let log = log.clone();
                    tokio::spawn(async move {
                        assert_eq!(stream.request.room, "hall");
                        let Ok(lines) = log.since(stream.request.from) else { return };
                        for chunk in lines.chunks(500) {
                            if stream.write_lines(chunk).await.is_err() {
                                return;
                            }
                            tokio::task::yield_now().await;
                        }
                        stream.finish();
                    });
                }
            });
        }
    });
}

/// An edge: connects, subscribes, and runs its replica as lines come; with `drop_at`, it
/// drops its connection after that many lines and resumes on a new one from where it was.
async fn edge(
    addr: std::net::SocketAddr,
    cert: Vec<u8>,
    audience: Vec<(u64, Input)>,
    drop_at: Option<usize>,
) -> (Vec<(Vec<encore::components::output::Event>, u64)>, u64, usize) {
    // The engine comes from the stream's first line, the origin's configuration.
    let link = OriginLink::connect(addr, cert.clone()).await.expect("the origin is there");
    let mut first = link.subscribe("hall", 0, SECRET).await.expect("a stream");
    let header = first.next().await.expect("a good line").expect("a header");
    let mut replica = Replica::from_header(&header).expect("a good header");
    drop((first, link));
    let tick_us = replica.engine().tick_us();
    let mut local = audience.into_iter().peekable();
    let mut ticks = Vec::new();
    let mut sent = 0;
    let mut position = 1;
    let mut connections = 0;
    'connections: loop {
        connections += 1;
        let link = OriginLink::connect(addr, cert.clone()).await.expect("the origin is there");
        let mut lines = link.subscribe("hall", position, SECRET).await.expect("a stream");
        loop {
            if drop_at.is_some_and(|at| connections == 1 && lines.position() >= at) {
                position = lines.position();
                continue 'connections;
            }
            let Some(line) = lines.next().await.expect("a good line") else { break 'connections };
            replica.line(line).expect("in order");
            while replica.ready() {
                let tick = replica.engine().next_tick();
                while let Some((at_us, input)) = local.next_if(|(at_us, _)| at_us.div_ceil(tick_us) <= tick) {
                    replica.local(at_us, input).expect("a listener's input");
                }
                let output = replica.tick().expect("ready");
                sent += output.packets.len() as u64;
                ticks.push((utterance_events(&output.events), replica.engine().buffer_bytes()));
                replica.recycle(output);
            }
        }
    }
    (ticks, sent, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_over_quic_make_the_origins_utterances_one_after_a_reconnection() {
    let options = options(6, 300_000);
    let (_, inputs) = generate_events(&options);
    let end_tick = (options.seconds * 1_000_000 + 2_000_000) / options.config.tick_us();
    let origin_run = run(Engine::new(options.config.clone()).expect("valid"), &inputs, None, end_tick, false);
    let log = Arc::new(origin_run.log);
    let origin = Arc::new(RelayOrigin::bind(([127, 0, 0, 1], 0).into()).expect("bound"));
    let addr = origin.local_addr().expect("an address");
    let cert = origin.cert_der().to_vec();
    serve(origin.clone(), log.clone());

    // A wrong secret is refused on its stream.
    let link = OriginLink::connect(addr, cert.clone()).await.expect("connected");
    let mut refused = link.subscribe("hall", 0, "wrong").await.expect("a stream");
    let error = refused.next().await.expect_err("refused");
    assert_eq!(error.code(), "relay-refused", "{error}");

    let started = Instant::now();
    let a = edge(addr, cert.clone(), edge_audience(&options, 106, "a"), None);
    let b = edge(addr, cert, edge_audience(&options, 206, "b"), Some(log.len() / 2));
    let (a, b) = tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(a, b) }).await.expect("in time");
    println!(
        "relay over QUIC on loopback: {} lines, {} bytes to each of two edges in {:.2} s (both at once, one reconnecting)",
        log.len(),
        log.bytes(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(b.2, 2, "edge b reconnected once");
    for (name, (ticks, sent, _)) in [("a", &a), ("b", &b)] {
        assert!(*sent > 0, "edge {name}'s listeners heard nothing");
        assert_eq!(ticks.len(), origin_run.ticks.len(), "edge {name} ran every tick");
        for (tick, (origin, edge)) in origin_run.ticks.iter().zip(ticks).enumerate() {
            assert_eq!(origin, edge, "edge {name}, tick {tick}");
        }
    }
    origin.close();
}
