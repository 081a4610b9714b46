//! `encore serve` configuration: one set of names, read from the embedded defaults, then a TOML
//! file (`--config`), then the environment (`ENCORE_...`), then flags. An invalid value stops the
//! start with a message that names its key. docs/configuration.md lists every key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use encore_systems::components::config::EngineConfig;

use crate::auth::AuthConfig;

/// A configuration that cannot run, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ServerConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: impl Into<String>) -> ServerConfigError {
    ServerConfigError::Invalid { key: key.to_owned(), problem: problem.into() }
}

/// An ICE server handed to clients (STUN or TURN).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// HTTPS and WSS listen address.
    pub listen: SocketAddr,
    /// Where the self-signed certificate and other state are kept.
    pub data_dir: PathBuf,
    /// PEM certificate chain and key; both empty means a self-signed certificate made on first
    /// start and kept in `data_dir`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Worker threads running rooms; 0 means one per core.
    pub workers: usize,
    /// Write each room's inputs and trace here (`--record`); none when absent.
    pub record_dir: Option<PathBuf>,
    /// Most rooms at once, and most peers in one room.
    pub max_rooms: usize,
    pub max_peers_per_room: usize,
    /// After SIGTERM, how long rooms may go on before their peers are told to go away.
    pub drain_timeout_s: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "0.0.0.0:8443".parse().expect("a valid address"),
            data_dir: PathBuf::from("data"),
            tls_cert: None,
            tls_key: None,
            workers: 0,
            record_dir: None,
            max_rooms: 1000,
            max_peers_per_room: 5000,
            drain_timeout_s: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaSection {
    /// The address the workers' media sockets bind. `0.0.0.0` means every interface: the host
    /// candidates then announce the machine's addresses (and loopback).
    pub bind_ip: IpAddr,
    /// UDP: worker `i` binds `udp_port + i` (one port per worker, every connection of its rooms
    /// on it); 0 lets each worker take any free port.
    pub udp_port: u16,
    /// ICE over TCP (RFC 6544, for clients whose UDP is blocked) on this one port; 0 takes any
    /// free port.
    pub tcp_port: u16,
    /// Offer the ICE-TCP candidate at all.
    pub ice_tcp: bool,
    /// The address announced in every host candidate instead of the machine's (1:1 NAT).
    pub public_ip: Option<IpAddr>,
    /// ICE servers handed to clients.
    pub ice_servers: Vec<IceServer>,
    /// A transport not connected (ICE and DTLS) this long after it was made is closed, and its
    /// client told (`transport_failed`).
    pub connect_timeout_s: u64,
}

impl Default for MediaSection {
    fn default() -> Self {
        MediaSection {
            bind_ip: "0.0.0.0".parse().expect("an address"),
            udp_port: 0,
            tcp_port: 0,
            ice_tcp: true,
            public_ip: None,
            ice_servers: Vec::new(),
            connect_timeout_s: 15,
        }
    }
}

/// Bounds on what one client, address or user can make the server hold (docs/operations.md,
/// "Limits"). A count of 0 means no bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// HTTPS and WSS connections one source address may hold at once (a WebSocket counts
    /// while it is open).
    pub connections_per_ip: usize,
    /// A TLS handshake not done this long after the connection was accepted is dropped.
    pub tls_handshake_timeout_s: u64,
    /// A request's header must arrive whole within this, the first one counted from the end
    /// of the handshake, the next ones from the end of the previous response (an idle
    /// keep-alive connection is closed after it too).
    pub header_timeout_s: u64,
    /// Signaling sessions (WebSockets) one user (uid) may hold at once.
    pub sessions_per_user: usize,
    /// Rooms one user may create in any minute.
    pub rooms_per_user_per_min: usize,
    /// WebSocket tickets one user may hold unredeemed at once.
    pub tickets_per_user: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            connections_per_ip: 256,
            tls_handshake_timeout_s: 10,
            header_timeout_s: 10,
            sessions_per_user: 8,
            rooms_per_user_per_min: 10,
            tickets_per_user: 16,
        }
    }
}

/// The default address of the Prometheus endpoint: loopback, so that metrics are not public
/// unless asked for.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `GET /metrics` answers (plain HTTP); `""` (none) turns the endpoint off.
    #[serde(with = "optional_address")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("a valid address")) }
    }
}

/// An address that may be switched off with an empty string (TOML has no null).
mod optional_address {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(address: &Option<SocketAddr>, serializer: S) -> Result<S::Ok, S::Error> {
        match address {
            Some(address) => serializer.collect_str(address),
            None => serializer.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
        super::parse_optional_address(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// `""` is none, anything else must be an address with a port.
fn parse_optional_address(text: &str) -> Result<Option<SocketAddr>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| format!("{e} (expected host:port, or \"\" for off)"))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, the event's fields at its top level.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected \"text\" or \"json\", got {other:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub format: LogFormat,
}

/// Many nodes sharing one room directory in Redis (docs/scaling.md). Without `redis_url` the
/// server runs alone, exactly as before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// `redis://HOST:PORT/DB` (with `user:password@` if need be); none: alone.
    pub redis_url: Option<String>,
    /// This node's id in the directory; none: one made at start (random, kept for the process).
    pub node_id: Option<String>,
    /// The HTTPS base URL clients use to reach this node (redirects send them there); none:
    /// the server's own URL (`https://` and its listen address).
    pub public_url: Option<String>,
    /// The UDP address of the origin→edge relay (QUIC); none: this node neither serves a
    /// room's relay to edges nor serves as an edge (docs/scaling.md, "One room across nodes").
    pub relay_listen: Option<SocketAddr>,
    /// The address other nodes reach this node's relay at; none: `relay_listen`, with the
    /// media's announced IP when it listens on a wildcard address.
    pub relay_public: Option<SocketAddr>,
    /// The cluster's relay secret, the same on every node: an edge's subscription names it.
    /// Required with `relay_listen`; never logged.
    pub relay_secret: Option<String>,
    /// A listener's join of a room that has at least this many peers on its origin goes to an
    /// edge node (one with a relay, not draining, fewest peers); 0: never.
    pub edge_after_peers: usize,
    /// The relay log an origin keeps of each room (from its start, so an edge that starts
    /// late can replay it), in bytes; past it no new edge can start on that room.
    pub relay_log_bytes: u64,
}

/// The relay log kept per room by default: about an hour of one talking speaker's audio.
pub const DEFAULT_RELAY_LOG_BYTES: u64 = 32 * 1024 * 1024;

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            redis_url: None,
            node_id: None,
            public_url: None,
            relay_listen: None,
            relay_public: None,
            relay_secret: None,
            edge_after_peers: 0,
            relay_log_bytes: DEFAULT_RELAY_LOG_BYTES,
        }
    }
}

/// The whole server configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub server: ServerSection,
    pub media: MediaSection,
    pub engine: EngineConfig,
    pub auth: AuthConfig,
    pub limits: LimitsSection,
    pub metrics: MetricsSection,
    pub log: LogSection,
    pub cluster: ClusterSection,
}

/// Flags of `encore serve` that override the configuration.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub record_dir: Option<PathBuf>,
    pub public_ip: Option<IpAddr>,
    /// `Some(None)` turns the metrics endpoint off.
    pub metrics_listen: Option<Option<SocketAddr>>,
    pub log_format: Option<LogFormat>,
    pub drain_timeout_s: Option<u64>,
}

impl ServerConfig {
    /// Defaults, then the file (if any), then the environment, then the flags; validated.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        overrides: &Overrides,
    ) -> Result<Self, ServerConfigError> {
        let mut config = match file {
            Some(path) => Self::from_file(path)?,
            None => ServerConfig::default(),
        };
        config.apply_env(&env)?;
        config.apply(overrides);
        // The server tells its rooms who the dominant speaker is, unless told not to.
        config.engine.dominant_speaker.events.get_or_insert(true);
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ServerConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ServerConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ServerConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ServerConfigError> {
        fn parse<T: std::str::FromStr>(key: &str, name: &str, value: String) -> Result<T, ServerConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.trim().parse().map_err(|e| invalid(key, format!("from {name}={value:?}: {e}")))
        }
        let s = &mut self.server;
        if let Some(v) = env("ENCORE_LISTEN") {
            s.listen = parse("server.listen", "ENCORE_LISTEN", v)?;
        }
        if let Some(v) = env("ENCORE_DATA_DIR") {
            s.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("ENCORE_TLS_CERT") {
            s.tls_cert = Some(PathBuf::from(v));
        }
        if let Some(v) = env("ENCORE_TLS_KEY") {
            s.tls_key = Some(PathBuf::from(v));
        }
        if let Some(v) = env("ENCORE_WORKERS") {
            s.workers = parse("server.workers", "ENCORE_WORKERS", v)?;
        }
        if let Some(v) = env("ENCORE_RECORD_DIR") {
            s.record_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = env("ENCORE_DRAIN_TIMEOUT_S") {
            s.drain_timeout_s = parse("server.drain_timeout_s", "ENCORE_DRAIN_TIMEOUT_S", v)?;
        }
        if let Some(v) = env("ENCORE_METRICS_LISTEN") {
            self.metrics.listen = parse_optional_address(&v)
                .map_err(|e| invalid("metrics.listen", format!("from ENCORE_METRICS_LISTEN={v:?}: {e}")))?;
        }
        if let Some(v) = env("ENCORE_LOG_FORMAT") {
            self.log.format = parse("log.format", "ENCORE_LOG_FORMAT", v)?;
        }
        let m = &mut self.media;
        if let Some(v) = env("ENCORE_PUBLIC_IP") {
            m.public_ip = Some(parse("media.public_ip", "ENCORE_PUBLIC_IP", v)?);
        }
        if let Some(v) = env("ENCORE_BIND_IP") {
            m.bind_ip = parse("media.bind_ip", "ENCORE_BIND_IP", v)?;
        }
        if let Some(v) = env("ENCORE_UDP_PORT") {
            m.udp_port = parse("media.udp_port", "ENCORE_UDP_PORT", v)?;
        }
        if let Some(v) = env("ENCORE_TCP_PORT") {
            m.tcp_port = parse("media.tcp_port", "ENCORE_TCP_PORT", v)?;
        }
        let l = &mut self.limits;
        if let Some(v) = env("ENCORE_CONNECTIONS_PER_IP") {
            l.connections_per_ip = parse("limits.connections_per_ip", "ENCORE_CONNECTIONS_PER_IP", v)?;
        }
        if let Some(v) = env("ENCORE_SESSIONS_PER_USER") {
            l.sessions_per_user = parse("limits.sessions_per_user", "ENCORE_SESSIONS_PER_USER", v)?;
        }
        let e = &mut self.engine;
        if let Some(v) = env("ENCORE_TICK_MS") {
            e.tick_ms = parse("engine.tick_ms", "ENCORE_TICK_MS", v)?;
        }
        if let Some(v) = env("ENCORE_BUFFER_MAX_BYTES") {
            e.buffer_max_bytes = parse("engine.buffer_max_bytes", "ENCORE_BUFFER_MAX_BYTES", v)?;
        }
        if let Some(v) = env("ENCORE_MAX_UTTERANCE_MS") {
            e.max_utterance_ms = parse("engine.max_utterance_ms", "ENCORE_MAX_UTTERANCE_MS", v)?;
        }
        let c = &mut self.cluster;
        if let Some(v) = env("ENCORE_REDIS_URL") {
            c.redis_url = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        }
        if let Some(v) = env("ENCORE_NODE_ID") {
            c.node_id = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        }
        if let Some(v) = env("ENCORE_PUBLIC_URL") {
            c.public_url = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        }
        if let Some(v) = env("ENCORE_RELAY_LISTEN") {
            c.relay_listen = Some(parse("cluster.relay_listen", "ENCORE_RELAY_LISTEN", v)?);
        }
        if let Some(v) = env("ENCORE_RELAY_PUBLIC") {
            c.relay_public = Some(parse("cluster.relay_public", "ENCORE_RELAY_PUBLIC", v)?);
        }
        if let Some(v) = env("ENCORE_RELAY_SECRET") {
            c.relay_secret = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        }
        if let Some(v) = env("ENCORE_EDGE_AFTER_PEERS") {
            c.edge_after_peers = parse("cluster.edge_after_peers", "ENCORE_EDGE_AFTER_PEERS", v)?;
        }
        self.auth.apply_env(env).map_err(|e| invalid_auth(&e))?;
        Ok(())
    }

    fn apply(&mut self, overrides: &Overrides) {
        if let Some(listen) = overrides.listen {
            self.server.listen = listen;
        }
        if let Some(dir) = &overrides.data_dir {
            self.server.data_dir = dir.clone();
        }
        if let Some(workers) = overrides.workers {
            self.server.workers = workers;
        }
        if let Some(dir) = &overrides.record_dir {
            self.server.record_dir = Some(dir.clone());
        }
        if let Some(ip) = overrides.public_ip {
            self.media.public_ip = Some(ip);
        }
        if let Some(listen) = overrides.metrics_listen {
            self.metrics.listen = listen;
        }
        if let Some(format) = overrides.log_format {
            self.log.format = format;
        }
        if let Some(timeout) = overrides.drain_timeout_s {
            self.server.drain_timeout_s = timeout;
        }
    }

    pub fn validate(&self) -> Result<(), ServerConfigError> {
        let s = &self.server;
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err(invalid("server.tls_cert", "and server.tls_key go together: give both or neither"));
        }
        if s.workers > 1024 {
            return Err(invalid("server.workers", format!("must be at most 1024, got {}", s.workers)));
        }
        if s.max_rooms == 0 {
            return Err(invalid("server.max_rooms", "must be at least 1"));
        }
        if s.max_peers_per_room == 0 {
            return Err(invalid("server.max_peers_per_room", "must be at least 1"));
        }
        if s.drain_timeout_s > 86_400 {
            return Err(invalid(
                "server.drain_timeout_s",
                format!("must be at most 86400 (a day), got {}", s.drain_timeout_s),
            ));
        }
        if let Some(metrics) = self.metrics.listen
            && metrics == s.listen
            && metrics.port() != 0
        {
            return Err(invalid("metrics.listen", format!("is the same address as server.listen ({metrics})")));
        }
        let m = &self.media;
        if m.udp_port != 0 && usize::from(m.udp_port) + self.worker_count() > 65_536 {
            return Err(invalid(
                "media.udp_port",
                format!("{} plus one port per worker ({}) runs past 65535", m.udp_port, self.worker_count()),
            ));
        }
        if m.public_ip.is_some_and(|ip| ip.is_unspecified()) {
            return Err(invalid("media.public_ip", "must be a reachable address, not 0.0.0.0"));
        }
        if m.connect_timeout_s == 0 || m.connect_timeout_s > 600 {
            return Err(invalid("media.connect_timeout_s", "must be between 1 and 600"));
        }
        for server in &m.ice_servers {
            if server.urls.is_empty()
                || server
                    .urls
                    .iter()
                    .any(|u| !(u.starts_with("stun:") || u.starts_with("turn:") || u.starts_with("turns:")))
            {
                return Err(invalid(
                    "media.ice_servers",
                    "every entry needs urls starting with stun:, turn: or turns:",
                ));
            }
        }
        let l = &self.limits;
        if l.tls_handshake_timeout_s == 0 || l.tls_handshake_timeout_s > 300 {
            return Err(invalid("limits.tls_handshake_timeout_s", "must be between 1 and 300"));
        }
        if l.header_timeout_s == 0 || l.header_timeout_s > 300 {
            return Err(invalid("limits.header_timeout_s", "must be between 1 and 300"));
        }
        let c = &self.cluster;
        if let Some(url) = &c.redis_url {
            // Parsed as the client will; the message names the scheme, never the password.
            if redis::parse_redis_url(url).is_none()
                || !(url.starts_with("redis://") || url.starts_with("redis+unix://"))
            {
                return Err(invalid("cluster.redis_url", "must be a redis:// URL (redis://HOST:PORT/DB)"));
            }
        }
        if let Some(id) = &c.node_id
            && (id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)))
        {
            return Err(invalid("cluster.node_id", "must be 1 to 64 characters of A-Z, a-z, 0-9, _ . -"));
        }
        if let Some(url) = &c.public_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(invalid("cluster.public_url", "must be an https:// base URL"));
        }
        if c.relay_listen.is_some() {
            if c.redis_url.is_none() {
                return Err(invalid(
                    "cluster.relay_listen",
                    "needs cluster.redis_url: edges find their origin in the directory",
                ));
            }
            if c.relay_secret.as_ref().is_none_or(|s| s.len() < 16) {
                return Err(invalid(
                    "cluster.relay_secret",
                    "must be set, at least 16 characters, with cluster.relay_listen",
                ));
            }
        }
        if c.relay_log_bytes < 64 * 1024 {
            return Err(invalid("cluster.relay_log_bytes", "must be at least 65536"));
        }
        self.engine.validate().map_err(|e| invalid(&format!("engine.{}", e.key), e.problem))?;
        self.auth.validate().map_err(|e| invalid_auth(&e))?;
        Ok(())
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

fn invalid_auth(error: &crate::auth::AuthConfigError) -> ServerConfigError {
    invalid(error.key, error.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_defaults_are_valid_and_listen_on_8443_in_dev_mode() {
        let config = ServerConfig::load(None, no_env, &Overrides::default()).unwrap();
        assert_eq!(config.server.listen.port(), 8443);
        assert_eq!(config.auth.mode, crate::auth::AuthMode::Dev);
        let mut engine = EngineConfig::default();
        engine.dominant_speaker.events = Some(true);
        assert_eq!(config.engine, engine, "the engine's defaults, and dominant-speaker events on");
    }

    #[test]
    fn dominant_speaker_events_may_be_turned_off() {
        let dir = std::env::temp_dir().join(format!("encore-config-dominant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("encore.toml");
        std::fs::write(&file, "[engine.dominant_speaker]\nevents = false\n[engine.recommender]\npolicy = \"learn\"\n")
            .unwrap();
        let config = ServerConfig::load(Some(&file), no_env, &Overrides::default()).unwrap();
        assert!(!config.engine.dominant_speaker.events());
        assert_eq!(config.engine.recommender.policy, encore_systems::components::Policy::Learn);
    }

    #[test]
    fn file_then_environment_then_flags() {
        let dir = std::env::temp_dir().join(format!("encore-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("encore.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:9000\"\nworkers = 2\n[engine]\nbuffer_max_bytes = 5000000\n[engine.vad]\nhangover_ms = 300\n",
        )
        .unwrap();
        let env = |key: &str| match key {
            "ENCORE_WORKERS" => Some("3".to_owned()),
            "ENCORE_MAX_UTTERANCE_MS" => Some("10000".to_owned()),
            _ => None,
        };
        let flags = Overrides { workers: Some(4), ..Overrides::default() };
        let config = ServerConfig::load(Some(&file), env, &flags).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(config.server.workers, 4);
        assert_eq!(config.engine.buffer_max_bytes, 5_000_000);
        assert_eq!(config.engine.vad.hangover_ms, 300);
        assert_eq!(config.engine.max_utterance_ms, 10_000);
    }

    #[test]
    fn cluster_keys_from_file_and_environment() {
        let defaults = ServerConfig::load(None, no_env, &Overrides::default()).unwrap();
        assert_eq!(defaults.cluster, ClusterSection::default(), "alone by default");
        let env = |key: &str| match key {
            "ENCORE_REDIS_URL" => Some("redis://127.0.0.1:6399/0".to_owned()),
            "ENCORE_NODE_ID" => Some("node-a".to_owned()),
            _ => None,
        };
        let config = ServerConfig::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(config.cluster.redis_url.as_deref(), Some("redis://127.0.0.1:6399/0"));
        assert_eq!(config.cluster.node_id.as_deref(), Some("node-a"));
        for (key, value, named) in [
            ("ENCORE_REDIS_URL", "http://x", "cluster.redis_url"),
            ("ENCORE_NODE_ID", "a b", "cluster.node_id"),
            ("ENCORE_PUBLIC_URL", "wss://x", "cluster.public_url"),
        ] {
            let env = |k: &str| (k == key).then(|| value.to_owned());
            let err = ServerConfig::load(None, env, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
    }

    #[test]
    fn a_relay_needs_the_directory_and_a_long_secret() {
        let relay = |secret: Option<&'static str>, redis: bool| {
            move |key: &str| match key {
                "ENCORE_REDIS_URL" if redis => Some("redis://127.0.0.1:6399/0".to_owned()),
                "ENCORE_RELAY_LISTEN" => Some("127.0.0.1:7700".to_owned()),
                "ENCORE_RELAY_SECRET" => secret.map(str::to_owned),
                "ENCORE_EDGE_AFTER_PEERS" => Some("500".to_owned()),
                _ => None,
            }
        };
        let config = ServerConfig::load(None, relay(Some("sixteen-chars-ok"), true), &Overrides::default()).unwrap();
        let c = &config.cluster;
        assert_eq!(c.relay_listen, Some("127.0.0.1:7700".parse().unwrap()));
        assert_eq!((c.relay_secret.as_deref(), c.edge_after_peers), (Some("sixteen-chars-ok"), 500));
        assert_eq!(c.relay_log_bytes, DEFAULT_RELAY_LOG_BYTES);
        for (secret, redis, named) in [
            (Some("short"), true, "cluster.relay_secret"),
            (None, true, "cluster.relay_secret"),
            (Some("sixteen-chars-ok"), false, "cluster.relay_listen"),
        ] {
            let err = ServerConfig::load(None, relay(secret, redis), &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
            assert!(!err.contains("sixteen-chars-ok"), "never the secret: {err}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(&str, &str)> = vec![
            ("[server]\nlisten = \"nowhere\"\n", "listen"),
            ("[server]\nlistn = \"127.0.0.1:1\"\n", "listn"),
            ("[media]\nudp_port = 65535\n", "media.udp_port"),
            ("[media]\nudp_port_min = 5000\n", "udp_port_min"),
            ("[engine]\ntick_ms = 0\n", "engine.tick_ms"),
            ("[server]\ntls_cert = \"a.pem\"\n", "server.tls_cert"),
            ("[media]\nice_servers = [{urls = [\"http://x\"]}]\n", "media.ice_servers"),
            ("[auth]\nskew_s = 9999\n", "auth.skew_s"),
        ];
        let dir = std::env::temp_dir().join(format!("encore-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, (text, key)) in cases.into_iter().enumerate() {
            let file = dir.join(format!("bad{i}.toml"));
            std::fs::write(&file, text).unwrap();
            let err = ServerConfig::load(Some(&file), no_env, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
        let env = |key: &str| (key == "ENCORE_WORKERS").then(|| "many".to_owned());
        let err = ServerConfig::load(None, env, &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("server.workers") && err.contains("ENCORE_WORKERS"), "{err}");
        for (key, value, named) in [
            ("ENCORE_LOG_FORMAT", "xml", "log.format"),
            ("ENCORE_METRICS_LISTEN", "9464", "metrics.listen"),
            ("ENCORE_DRAIN_TIMEOUT_S", "-1", "server.drain_timeout_s"),
        ] {
            let env = |k: &str| (k == key).then(|| value.to_owned());
            let err = ServerConfig::load(None, env, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(named) && err.contains(key), "{err}");
        }
    }

    #[test]
    fn metrics_log_and_drain_from_file_environment_and_flags() {
        let defaults = ServerConfig::load(None, no_env, &Overrides::default()).unwrap();
        assert_eq!(defaults.metrics.listen, Some(DEFAULT_METRICS_LISTEN.parse().unwrap()));
        assert_eq!(defaults.log.format, LogFormat::Text);
        assert_eq!(defaults.server.drain_timeout_s, 300);

        let dir = std::env::temp_dir().join(format!("encore-config-ops-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("encore.toml");
        std::fs::write(&file, "[metrics]\nlisten = \"\"\n[log]\nformat = \"json\"\n[server]\ndrain_timeout_s = 30\n")
            .unwrap();
        let config = ServerConfig::load(Some(&file), no_env, &Overrides::default()).unwrap();
        assert_eq!(
            (config.metrics.listen, config.log.format, config.server.drain_timeout_s),
            (None, LogFormat::Json, 30)
        );
        let text = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<ServerConfig>(&text).unwrap(), config, "an off endpoint survives a round trip");

        let env = |key: &str| match key {
            "ENCORE_METRICS_LISTEN" => Some("0.0.0.0:9100".to_owned()),
            "ENCORE_LOG_FORMAT" => Some("text".to_owned()),
            "ENCORE_DRAIN_TIMEOUT_S" => Some("60".to_owned()),
            _ => None,
        };
        let config = ServerConfig::load(Some(&file), env, &Overrides::default()).unwrap();
        assert_eq!(config.metrics.listen, Some("0.0.0.0:9100".parse().unwrap()));
        assert_eq!((config.log.format, config.server.drain_timeout_s), (LogFormat::Text, 60));

        let flags = Overrides {
            metrics_listen: Some(None),
            log_format: Some(LogFormat::Json),
            drain_timeout_s: Some(5),
            ..Overrides::default()
        };
        let config = ServerConfig::load(Some(&file), env, &flags).unwrap();
        assert_eq!(
            (config.metrics.listen, config.log.format, config.server.drain_timeout_s),
            (None, LogFormat::Json, 5)
        );

        std::fs::write(&file, "[metrics]\nlisten = \"localhost\"\n").unwrap();
        let err = ServerConfig::load(Some(&file), no_env, &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
    }
}
