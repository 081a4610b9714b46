//! Many nodes, one room directory: each node registers itself in Redis with a TTL, each room is
//! owned by the node it runs on, a room nobody runs is placed on the least-loaded live node
//! under a short Redis lock, and a join that reaches the wrong node is redirected with a ticket
//! the right node redeems through Redis. docs/scaling.md has the design, the keys and the
//! failure modes.
//!
//! Redis is shared state, never the media or the rooms' own state: a room lives and dies on one
//! node, so a Redis outage costs only placement (a new room is then made where it was asked
//! for, with a warning) and redirects, never a running room.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::auth::AuthUser;
use crate::config::ClusterSection;

/// A node refreshes its entry and its rooms' this often.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A node (and each of its rooms) not refreshed for this long is gone from the directory.
pub const ENTRY_TTL: Duration = Duration::from_secs(6);
/// How long one node may hold a room's placement lock (it takes a few milliseconds).
const LOCK_TTL: Duration = Duration::from_secs(3);
/// How long a node that lost the placement race waits for the winner's decision.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// A directory call longer than this counts as Redis being out (the join goes on locally).
pub const CALL_TIMEOUT: Duration = Duration::from_millis(800);
/// Every key starts with this.
const PREFIX: &str = "encore:";
/// Cluster tickets start with this, which a local ticket (base64url) never contains.
pub const TICKET_PREFIX: &str = "cl.";

/// Deletes a key only while it still holds the value given: a node never deletes a room key or a
/// lock that another node took since.
const DELETE_IF_OWNED: &str =
    r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Sets a room's key to this node (with a TTL) unless it names another node.
const CLAIM: &str = r"local v = redis.call('get', KEYS[1]) if not v or v == ARGV[1] then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end return 0";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.redis_url: {0}")]
    Url(#[source] redis::RedisError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("a directory entry is not what this node writes: {0}")]
    Entry(#[from] serde_json::Error),
    #[error("no OS randomness for a ticket")]
    Random,
}

impl ClusterError {
    /// A stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ClusterError::Url(_) => "url",
            ClusterError::Redis(_) => "redis",
            ClusterError::Timeout(_) => "timeout",
            ClusterError::Entry(_) => "entry",
            ClusterError::Random => "random",
        }
    }
}

/// A node's entry in the directory (`encore:node:{id}`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// The HTTPS base clients reach it at.
    pub url: String,
    pub rooms: usize,
    pub peers: usize,
    pub draining: bool,
    /// Its workers' media sockets (`ip:port`, as bound), for operators and firewalls.
    #[serde(default)]
    pub media: Vec<String>,
    /// The process's CPU over the last beat, in percent of one core, and the media datagrams it
    /// received and sent a second: load figures for operators (placement goes by rooms, then
    /// peers).
    #[serde(default)]
    pub cpu_percent: u32,
    #[serde(default)]
    pub datagrams_per_s: u64,
    /// Its origin→edge relay, when it has one: the address edges connect to, and its
    /// certificate (DER, base64url), which they pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayAddress>,
    /// When it wrote this (Unix ms), for people reading Redis.
    pub at_ms: u64,
}

/// Where a node's relay listens, and the certificate its edges pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAddress {
    pub addr: std::net::SocketAddr,
    /// DER, base64url without padding.
    pub cert: String,
}

impl RelayAddress {
    pub fn new(addr: std::net::SocketAddr, cert_der: &[u8]) -> Self {
        RelayAddress { addr, cert: URL_SAFE_NO_PAD.encode(cert_der) }
    }

    /// The certificate's DER; none when the entry's is not base64url.
    pub fn cert_der(&self) -> Option<Vec<u8>> {
        URL_SAFE_NO_PAD.decode(&self.cert).ok()
    }
}

/// What a cluster ticket stands for (`encore:ticket:{ticket}`, JSON): the verified user and,
/// when an origin sent the user to an edge, the room the redeeming node serves as its edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketGrant {
    pub user: AuthUser,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_room: Option<String>,
}

/// What a node knows of its own load when it writes its entry or places a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    pub rooms: usize,
    pub peers: usize,
    pub draining: bool,
    pub cpu_percent: u32,
    pub datagrams_per_s: u64,
}

/// Where a join should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Here: the room runs here, or was placed here.
    Local,
    /// On that live node.
    Remote(NodeInfo),
}

/// This node's handle on the directory.
pub struct Cluster {
    redis: ConnectionManager,
    pub node_id: String,
    pub public_url: String,
    /// Its workers' media sockets, for its entry.
    pub media: Vec<String>,
    /// Its relay, for its entry.
    pub relay: Option<RelayAddress>,
    delete_if_owned: redis::Script,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("Cluster").field("node_id", &self.node_id).field("public_url", &self.public_url).finish()
    }
}

fn node_key(id: &str) -> String {
    format!("{PREFIX}node:{id}")
}

fn room_key(room: &str) -> String {
    format!("{PREFIX}room:{room}")
}

fn lock_key(room: &str) -> String {
    format!("{PREFIX}lock:room:{room}")
}

fn ticket_key(ticket: &str) -> String {
    format!("{PREFIX}ticket:{ticket}")
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// A node id made at start: random, so two processes never share one, and the same for the
/// life of the process.
pub fn generated_node_id() -> String {
    let mut bytes = [0u8; 6];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness: the pid and the time still tell processes apart.
        let seed = u64::from(std::process::id()) << 32 ^ now_ms();
        bytes.copy_from_slice(&seed.to_be_bytes()[2..]);
    }
    format!("node-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

impl Cluster {
    /// A handle on the directory at `config.redis_url`. The connection is made lazily and
    /// remade by itself after an outage, so a node starts even while Redis is down.
    pub fn new(
        config: &ClusterSection,
        redis_url: &str,
        own_url: &str,
        media: Vec<String>,
        relay: Option<RelayAddress>,
    ) -> Result<Self, ClusterError> {
        let client = redis::Client::open(redis_url).map_err(ClusterError::Url)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_lazy_with_config(client, manager_config).map_err(ClusterError::Url)?;
        Ok(Cluster {
            redis,
            node_id: config.node_id.clone().unwrap_or_else(generated_node_id),
            public_url: config
                .public_url
                .clone()
                .unwrap_or_else(|| own_url.to_owned())
                .trim_end_matches('/')
                .to_owned(),
            media,
            relay,
            delete_if_owned: redis::Script::new(DELETE_IF_OWNED),
        })
    }

    fn redis(&self) -> ConnectionManager {
        self.redis.clone()
    }

    /// This node's entry, with its load now.
    fn own_entry(&self, load: Load) -> NodeInfo {
        NodeInfo {
            id: self.node_id.clone(),
            url: self.public_url.clone(),
            rooms: load.rooms,
            peers: load.peers,
            draining: load.draining,
            media: self.media.clone(),
            cpu_percent: load.cpu_percent,
            datagrams_per_s: load.datagrams_per_s,
            relay: self.relay.clone(),
            at_ms: now_ms(),
        }
    }

    /// The live entry of the node that owns `room`, if any (an edge looks its origin up).
    pub async fn owner_entry(&self, room: &str) -> Result<Option<NodeInfo>, ClusterError> {
        timed(async {
            let mut redis = self.redis();
            let owner: Option<String> = redis.get(room_key(room)).await?;
            let Some(owner) = owner else { return Ok(None) };
            let entry: Option<String> = redis.get(node_key(&owner)).await?;
            Ok(match entry {
                Some(entry) => Some(serde_json::from_str(&entry)?),
                None => None,
            })
        })
        .await
    }

    /// The node a listener of a large room that runs here should go to: a live node with a
    /// relay, not this one, not draining, with the fewest peers (those this node sent it
    /// since its entry was written counted in, `sent`), then the smaller id. None: there
    /// is none, the listener stays here.
    pub async fn edge_node(
        &self,
        sent: &std::collections::BTreeMap<String, usize>,
    ) -> Result<Option<NodeInfo>, ClusterError> {
        timed(async {
            let nodes = self.nodes(&mut self.redis()).await?;
            Ok(nodes
                .into_iter()
                .filter(|n| n.id != self.node_id && !n.draining && n.relay.is_some())
                .min_by_key(|n| (n.peers + sent.get(&n.id).copied().unwrap_or(0), n.id.clone())))
        })
        .await
    }

    /// Writes this node's entry and refreshes the keys of `rooms` (the rooms it runs), and
    /// deletes the keys of `closed` (rooms that closed since), all with [`ENTRY_TTL`].
    pub async fn heartbeat(&self, load: Load, rooms: &[String], closed: &[String]) -> Result<(), ClusterError> {
        timed(async {
            let info = self.own_entry(load);
            let ttl = millis(ENTRY_TTL);
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(node_key(&self.node_id)).arg(serde_json::to_string(&info)?).arg("PX").arg(ttl).ignore();
            // A running room's key is refreshed while it names this node, and claimed when it
            // names none (after a Redis restart, or placed here a moment ago). One that names
            // another node stays: the room ran on both during an outage, and the directory keeps
            // the first claim rather than flip between the two at every beat. EVAL with the
            // text (a few dozen bytes) keeps it in the one pipeline.
            for room in rooms {
                pipe.cmd("EVAL").arg(CLAIM).arg(1).arg(room_key(room)).arg(&self.node_id).arg(ttl).ignore();
            }
            let mut redis = self.redis();
            pipe.query_async::<()>(&mut redis).await?;
            for room in closed {
                self.delete_if_owned.key(room_key(room)).arg(&self.node_id).invoke_async::<i64>(&mut redis).await?;
            }
            Ok(())
        })
        .await
    }

    /// Takes this node out of the directory (a clean stop): its entry and its rooms' keys.
    pub async fn leave(&self, rooms: &[String]) -> Result<(), ClusterError> {
        timed(async {
            let mut redis = self.redis();
            redis.del::<_, ()>(node_key(&self.node_id)).await?;
            for room in rooms {
                self.delete_if_owned.key(room_key(room)).arg(&self.node_id).invoke_async::<i64>(&mut redis).await?;
            }
            Ok(())
        })
        .await
    }

    /// Where a join for `room`, which does not run here, should go. A room owned by a live
    /// node goes there; a room nobody owns (or whose node is gone) is placed, under the room's
    /// lock, on the least-loaded live node that is not draining (this node on a tie, as it
    /// saves the client a hop). `own` is this node's load now (its entry may be a heartbeat
    /// old, or gone after a Redis restart).
    pub async fn route(&self, room: &str, own: Load) -> Result<Route, ClusterError> {
        timed(async {
            let mut redis = self.redis();
            if let Some(route) = self.owner(&mut redis, room, own).await? {
                return Ok(route);
            }
            let locked: Option<String> = redis::cmd("SET")
                .arg(lock_key(room))
                .arg(&self.node_id)
                .arg("NX")
                .arg("PX")
                .arg(millis(LOCK_TTL))
                .query_async(&mut redis)
                .await?;
            if locked.is_none() {
                // Another node is placing it: its decision is the room's.
                let deadline = tokio::time::Instant::now() + LOCK_WAIT;
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    if let Some(route) = self.owner(&mut redis, room, own).await? {
                        return Ok(route);
                    }
                }
                return Err(ClusterError::Timeout(LOCK_WAIT));
            }
            let placed = self.place(&mut redis, room, own).await;
            // The lock is released whatever happened (it would expire anyway).
            let _ = self.delete_if_owned.key(lock_key(room)).arg(&self.node_id).invoke_async::<i64>(&mut redis).await;
            placed
        })
        .await
    }

    /// Under the room's lock: looks once more (another node may have placed it just before),
    /// then chooses a node and writes the room's key.
    async fn place(&self, redis: &mut ConnectionManager, room: &str, own: Load) -> Result<Route, ClusterError> {
        if let Some(route) = self.owner(redis, room, own).await? {
            return Ok(route);
        }
        let mut nodes = self.nodes(redis).await?;
        nodes.retain(|n| n.id != self.node_id);
        nodes.push(self.own_entry(own));
        let chosen = nodes
            .into_iter()
            .filter(|n| !n.draining)
            .min_by_key(|n| (n.rooms, n.peers, n.id != self.node_id, n.id.clone()));
        let Some(chosen) = chosen else {
            // Every node drains, this one too: the join is refused here, as alone.
            return Ok(Route::Local);
        };
        redis::cmd("SET")
            .arg(room_key(room))
            .arg(&chosen.id)
            .arg("PX")
            .arg(millis(ENTRY_TTL))
            .query_async::<()>(redis)
            .await?;
        tracing::info!(room, node = %chosen.id, rooms = chosen.rooms, peers = chosen.peers, "room placed");
        Ok(if chosen.id == self.node_id { Route::Local } else { Route::Remote(chosen) })
    }

    /// The room's owner, if it has one that is alive.
    /// A room placed here that does not run here yet counts as not owned while this node
    /// drains (it could not make it): it is placed again, elsewhere.
    async fn owner(&self, redis: &mut ConnectionManager, room: &str, own: Load) -> Result<Option<Route>, ClusterError> {
        let owner: Option<String> = redis.get(room_key(room)).await?;
        let Some(owner) = owner else { return Ok(None) };
        if owner == self.node_id {
            return Ok((!own.draining).then_some(Route::Local));
        }
        let entry: Option<String> = redis.get(node_key(&owner)).await?;
        match entry {
            Some(entry) => Ok(Some(Route::Remote(serde_json::from_str(&entry)?))),
            // Its node is gone (its entry expired before the room's key did): place it again.
            None => Ok(None),
        }
    }

    /// Every live node's entry.
    pub async fn nodes(&self, redis: &mut ConnectionManager) -> Result<Vec<NodeInfo>, ClusterError> {
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{PREFIX}node:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(redis)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(redis).await?;
        // An entry that expired between SCAN and MGET is simply not there.
        Ok(entries.into_iter().flatten().filter_map(|e| serde_json::from_str(&e).ok()).collect())
    }

    /// Every live node's entry (for tests and operators).
    pub async fn live_nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        timed(async { self.nodes(&mut self.redis()).await }).await
    }

    /// A single-use ticket for a user (and maybe an edge's room) that any node of the cluster redeems (once) within `ttl`.
    pub async fn issue_ticket(&self, grant: &TicketGrant, ttl: Duration) -> Result<String, ClusterError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| ClusterError::Random)?;
        let ticket = format!("{TICKET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        let user = serde_json::to_string(grant)?;
        timed(async {
            let mut redis = self.redis();
            redis::cmd("SET")
                .arg(ticket_key(&ticket))
                .arg(user)
                .arg("PX")
                .arg(millis(ttl))
                .query_async::<()>(&mut redis)
                .await?;
            Ok(())
        })
        .await?;
        Ok(ticket)
    }

    /// Redeems a cluster ticket: the user it stands for, once; none when unknown, used or
    /// expired.
    pub async fn redeem_ticket(&self, ticket: &str) -> Result<Option<TicketGrant>, ClusterError> {
        timed(async {
            let mut redis = self.redis();
            let user: Option<String> = redis::cmd("GETDEL").arg(ticket_key(ticket)).query_async(&mut redis).await?;
            Ok(match user {
                Some(user) => Some(serde_json::from_str(&user)?),
                None => None,
            })
        })
        .await
    }
}

/// Runs a directory call with [`CALL_TIMEOUT`] (twice that for placement's lock wait).
async fn timed<T>(call: impl Future<Output = Result<T, ClusterError>>) -> Result<T, ClusterError> {
    let limit = CALL_TIMEOUT * 2 + LOCK_WAIT;
    tokio::time::timeout(limit, call).await.map_err(|_| ClusterError::Timeout(limit))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_differ_and_are_valid_node_ids() {
        let (a, b) = (generated_node_id(), generated_node_id());
        assert_ne!(a, b);
        assert!(a.len() <= 64 && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
    }

    #[test]
    fn a_cluster_ticket_is_never_a_local_one() {
        assert!(!URL_SAFE_NO_PAD.encode([0xffu8; 32]).contains('.'));
        assert!(TICKET_PREFIX.contains('.'));
    }
}
