//! Rooms across nodes: a real `redis-server` and three real `encore serve` processes on
//! loopback sharing a room directory (docs/scaling.md). A client that joins a room on the wrong
//! node ends up in the right one (redirect with a ticket), a new room goes to the least-loaded
//! node, a Redis restart does not close a running room, a killed node's room is placed again
//! after the entries' TTL, and a draining node gets no new rooms. And the demo page, in real
//! Chromium (tests/browser/redirect.mjs), follows a redirect to the room's node.
//!
//! `redis-server` is Debian's package: `.ci/run` installs it (scripts/cluster-deps.sh); the test
//! fails, not skips, without it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use encore::client::{ClientError, ClientTls, Signaling};
use encore::protocol::{ErrorCode, Request};

use super::support::{ServerProcess, free_port, temp_dir};

/// A `redis-server` on a loopback port, without persistence (a restart loses everything, the
/// worst case for the directory); killed when dropped.
pub(super) struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    fn binary() -> &'static str {
        const BIN: &str = "/usr/bin/redis-server";
        assert!(
            std::path::Path::new(BIN).exists(),
            "{BIN} is missing: run `bash scripts/cluster-deps.sh` (apt-get install redis-server), as .ci/run does"
        );
        BIN
    }

    pub(super) async fn start(port: u16, dir: PathBuf) -> RedisServer {
        let child = Command::new(Self::binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("redis-{port}.log"))).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = RedisServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.connection().await.is_none() {
            assert!(Instant::now() < deadline, "redis-server did not answer on port {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        redis
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn connection(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        let pong: String = redis::cmd("PING").query_async(&mut connection).await.ok()?;
        (pong == "PONG").then_some(connection)
    }

    async fn get(&self, key: &str) -> Option<String> {
        let mut connection = self.connection().await?;
        redis::cmd("GET").arg(key).query_async(&mut connection).await.ok()?
    }

    /// A node's entry, as JSON.
    pub(super) async fn node(&self, id: &str) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get(&format!("encore:node:{id}")).await?).ok()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same port, empty.
    async fn restart(mut self) -> RedisServer {
        self.kill();
        let (port, dir) = (self.port, self.dir.clone());
        RedisServer::start(port, dir).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `check` holds, at most `within`; how long it took.
pub(super) async fn until<F: Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

struct Cluster {
    nodes: Vec<ServerProcess>,
    tls: ClientTls,
}

impl Cluster {
    /// A session on `node` with a token that node issued (dev mode: each node its own issuer).
    async fn session(&self, node: usize, uid: &str) -> Signaling {
        let token = self.nodes[node].token(uid, "speaker").await;
        Signaling::connect(&self.tls, &self.nodes[node].base, Some(&token), None).await.expect("a session")
    }

    fn which(&self, session: &Signaling) -> usize {
        self.nodes.iter().position(|n| n.base == session.base).expect("a node of the cluster")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_live_on_one_node_and_joins_find_them() {
    let dir = temp_dir("cluster");
    let mut redis = RedisServer::start(free_port(), dir.clone()).await;
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let env = [("ENCORE_REDIS_URL", url.as_str()), ("ENCORE_NODE_ID", id), ("ENCORE_DRAIN_TIMEOUT_S", "60")];
        nodes.push(ServerProcess::start(&format!("cluster-{id}"), &[], &env).await);
    }
    // Every node has its own self-signed certificate: the clients trust the three.
    let mut pems = Vec::new();
    for node in &nodes {
        pems.extend(std::fs::read(node.data_dir.join("tls/cert.pem")).unwrap());
    }
    std::fs::write(dir.join("cluster.pem"), pems).unwrap();
    let cluster = Cluster { tls: ClientTls::trusting(&dir.join("cluster.pem")).unwrap(), nodes };
    for id in ["a", "b", "c"] {
        until(&format!("node {id} in the directory"), Duration::from_secs(10), || async {
            redis.node(id).await.is_some()
        })
        .await;
    }
    // An entry names the node's media sockets and its load figures.
    let entry = redis.node("a").await.expect("node a's entry");
    assert!(entry["media"].as_array().is_some_and(|m| !m.is_empty()), "{entry}");
    assert!(entry["cpu_percent"].is_u64() && entry["datagrams_per_s"].is_u64(), "{entry}");

    // A room nobody runs, on a cluster of idle nodes: placed where it was asked for.
    let alice = cluster.session(0, "alice").await;
    let (alice, joined) = alice.join_anywhere("standup", "alice").await.expect("alice joins");
    assert_eq!((cluster.which(&alice), joined.peers.len()), (0, 0));
    assert_eq!(redis.get("encore:room:standup").await.as_deref(), Some("a"));

    // The wrong node answers `redirect`, with the right node's URL and a ticket for it.
    let bob = cluster.session(1, "bob").await;
    let started = Instant::now();
    let refused = bob.join("standup", "bob").await.expect_err("standup lives on node a");
    let redirect_answer = started.elapsed();
    assert_eq!(refused.refusal(), Some(ErrorCode::Redirect), "{refused}");
    let ClientError::Refused { source, .. } = &refused else { panic!("{refused}") };
    let redirect = source.redirect.clone().expect("the redirect's target");
    assert_eq!((redirect.url.as_str(), redirect.node.as_str()), (cluster.nodes[0].base.as_str(), "a"));
    // A ticket is good once.
    let started = Instant::now();
    let there = Signaling::connect(&cluster.tls, &redirect.url, None, Some(&redirect.ticket)).await.unwrap();
    let ticket_session = started.elapsed();
    assert_eq!(there.welcome.uid, "bob", "the ticket stands for bob on node a");
    let again = Signaling::connect(&cluster.tls, &redirect.url, None, Some(&redirect.ticket)).await;
    assert_eq!(again.err().and_then(|e| e.refusal()), Some(ErrorCode::Unauthorized), "a used ticket");
    drop(there);

    // The client follows it by itself.
    let started = Instant::now();
    let (bob, joined) = bob.join_anywhere("standup", "bob").await.expect("bob joins through a redirect");
    let redirected_join = started.elapsed();
    assert_eq!(cluster.which(&bob), 0, "bob is on node a");
    assert_eq!(joined.peers.iter().map(|p| p.peer.as_str()).collect::<Vec<_>>(), ["alice"]);
    let direct = cluster.session(0, "dora").await;
    let started = Instant::now();
    direct.join("standup", "dora").await.expect("a direct join");
    let direct_join = started.elapsed();
    drop(direct);
    eprintln!(
        "figures: redirect answer {redirect_answer:?}; session on the right node with the ticket (TCP, TLS, \
         WebSocket, redeemed in Redis, welcome) {ticket_session:?}; join through a redirect (answer, new session, \
         join) {redirected_join:?}; direct join of a running room {direct_join:?}"
    );

    // A new room goes to the least-loaded node: a runs one, b and c none (b by its id).
    until("node a's entry counts its room", Duration::from_secs(5), || async {
        redis.node("a").await.is_some_and(|n| n["rooms"] == 1)
    })
    .await;
    let carol = cluster.session(0, "carol").await;
    let (carol, _) = carol.join_anywhere("second", "carol").await.expect("carol joins");
    assert_eq!(cluster.which(&carol), 1, "placed on node b, the least loaded");

    // Two nodes asked for the same new room at once: the lock makes one place it, the other
    // follows, and both clients end up on the same node.
    let (ivy, jon) = tokio::join!(
        async { cluster.session(1, "ivy").await.join_anywhere("race", "ivy").await.expect("ivy joins") },
        async { cluster.session(2, "jon").await.join_anywhere("race", "jon").await.expect("jon joins") },
    );
    assert_eq!(cluster.which(&ivy.0), cluster.which(&jon.0), "one room, on one node");
    assert_eq!(ivy.1.peers.len() + jon.1.peers.len(), 1, "the second to join saw the first");
    drop((ivy, jon));

    // Redis goes away: the rooms go on, and new rooms are made where they are asked for.
    redis.kill();
    let outage = Instant::now();
    alice.request::<encore::protocol::Done>(Request::Ping).await.expect("alice's session lives");
    let erin = cluster.session(0, "erin").await;
    let (_erin, joined) = erin.join_anywhere("standup", "erin").await.expect("a running room takes new peers");
    assert!(joined.peers.iter().any(|p| p.peer == "alice"), "{joined:?}");
    let solo = cluster.session(2, "solo").await;
    let started = Instant::now();
    let (solo, _) = solo.join_anywhere("solo", "solo").await.expect("a new room during the outage");
    let local_fallback = started.elapsed();
    assert_eq!(cluster.which(&solo), 2, "made where it was asked for");
    assert!(cluster.nodes[2].log_text().contains("the room directory is unreachable"), "the fallback is logged");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let redis = redis.restart().await;
    let outage = outage.elapsed();
    // The heartbeats write everything again.
    let rebuilt = until("the directory rebuilt after the restart", Duration::from_secs(15), || async {
        redis.get("encore:room:standup").await.as_deref() == Some("a")
            && redis.get("encore:room:solo").await.as_deref() == Some("c")
            && redis.get("encore:room:second").await.as_deref() == Some("b")
    })
    .await;
    alice.request::<encore::protocol::Done>(Request::Ping).await.expect("alice's session outlived the outage");
    let (frank, _) = cluster.session(1, "frank").await.join_anywhere("standup", "frank").await.unwrap();
    assert_eq!(cluster.which(&frank), 0, "redirected to node a again");
    drop(frank);
    eprintln!(
        "figures: Redis down {outage:?}: new room made locally in {local_fallback:?}; directory rebuilt \
         {rebuilt:?} after the restart"
    );

    // Node a dies: its room is free for placement once its entries expire.
    let mut cluster = cluster;
    let _ = cluster.nodes[0].child.kill();
    let _ = cluster.nodes[0].child.wait();
    let killed = Instant::now();
    let mut tries = 0;
    let gus = loop {
        tries += 1;
        let session = cluster.session(1, "gus").await;
        match session.join_anywhere("standup", "gus").await {
            Ok((session, joined)) => {
                assert!(joined.peers.is_empty(), "a new room, not node a's: {joined:?}");
                break session;
            }
            // The directory still names node a: it cannot be reached.
            Err(error) => {
                assert!(killed.elapsed() < Duration::from_secs(15), "standup not placed again: {error}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let replaced = killed.elapsed();
    assert_ne!(cluster.which(&gus), 0);
    eprintln!("figures: node a killed; standup placed again after {replaced:?} ({tries} tries)");

    // A draining node gets no new rooms: c drains (its room keeps it up), a new room asked of it
    // goes to b, the only node left that takes rooms.
    cluster.nodes[2].signal("TERM");
    until("node c marked draining", Duration::from_secs(5), || async {
        redis.node("c").await.is_some_and(|n| n["draining"] == true)
    })
    .await;
    let hal = cluster.session(2, "hal").await;
    let (hal, _) = hal.join_anywhere("fresh", "hal").await.expect("hal joins");
    assert_eq!(cluster.which(&hal), 1, "redirected away from the draining node");
    drop((solo, hal, gus, carol, bob, alice));
    let stopped = cluster.nodes[2].exited(Duration::from_secs(20)).await;
    assert!(stopped.is_some_and(|s| s.success()), "node c stops when its room empties");
    assert_eq!(redis.node("c").await, None, "a stopped node leaves the directory");
}

/// `scripts/browser-deps.sh`'s `KEY=VALUE` lines (it installs what is missing).
fn browser_deps() -> std::collections::HashMap<String, String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("bash")
        .arg(root.join("scripts/browser-deps.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/browser-deps.sh runs");
    assert!(output.status.success(), "scripts/browser-deps.sh failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// The demo page, opened on one node, follows a `redirect` to the node where its room lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_follows_a_redirect() {
    if std::env::var_os("ENCORE_SKIP_BROWSER_TEST").is_some_and(|v| !v.is_empty() && v != "0") {
        eprintln!("SKIPPED: the page's redirect in real Chromium (ENCORE_SKIP_BROWSER_TEST is set)");
        return;
    }
    let deps = tokio::task::spawn_blocking(browser_deps).await.unwrap();
    let dir = temp_dir("cluster-page");
    let redis = RedisServer::start(free_port(), dir.clone()).await;
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        let env = [("ENCORE_REDIS_URL", url.as_str()), ("ENCORE_NODE_ID", id)];
        nodes.push(ServerProcess::start(&format!("cluster-page-{id}"), &[], &env).await);
    }
    for id in ["a", "b"] {
        until(&format!("node {id} in the directory"), Duration::from_secs(10), || async {
            redis.node(id).await.is_some()
        })
        .await;
    }
    // The room lives on node a.
    let alice = nodes[0].client("alice", "speaker").await;
    alice.join("hall", "alice").await.expect("alice makes the room on node a");
    assert_eq!(redis.get("encore:room:hall").await.as_deref(), Some("a"));

    // The page is opened on node b.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/redirect.mjs");
    let mut command = tokio::process::Command::new(deps.get("NODE").map_or("node", String::as_str));
    command.arg(&script).arg(&nodes[1].base).arg("hall").stdin(Stdio::null()).kill_on_drop(true);
    for key in ["CHROMIUM", "NODE_PATH"] {
        if let Some(value) = deps.get(key) {
            command.env(key, value);
        }
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the browser script ends within 2 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| {
        panic!("no RESULT line:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    });
    let result: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(result["ok"], true, "{result}");
    let host = |base: &str| base.trim_start_matches("https://").to_owned();
    let sockets: Vec<String> =
        result["sockets"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect();
    assert_eq!(sockets.len(), 2, "the page's session on b, then on a: {sockets:?}");
    assert!(sockets[0].contains(&host(&nodes[1].base)), "first on node b: {sockets:?}");
    assert!(sockets[1].contains(&host(&nodes[0].base)), "then on node a: {sockets:?}");
    // Alice, on node a, sees the page's peer join her room.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(encore::protocol::Notice::PeerJoined { peer, .. }) =
            alice.notification(Duration::from_millis(200)).await
        {
            assert_eq!(peer, "pat");
            break;
        }
        assert!(Instant::now() < deadline, "no peer_joined for the page on node a");
    }
}
