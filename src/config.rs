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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaSection {
    /// Addresses whose interfaces carry media (UDP). `0.0.0.0` means every interface of the
    /// machine; loopback is always added so local clients work.
    pub bind_ips: Vec<IpAddr>,
    /// UDP port range for media; 0 and 0 mean ephemeral ports.
    pub udp_port_min: u16,
    pub udp_port_max: u16,
    /// The address announced to clients in place of the host's (1:1 NAT).
    pub public_ip: Option<IpAddr>,
    /// ICE servers handed to clients.
    pub ice_servers: Vec<IceServer>,
}

impl Default for MediaSection {
    fn default() -> Self {
        MediaSection {
            bind_ips: vec!["0.0.0.0".parse().expect("an address")],
            udp_port_min: 0,
            udp_port_max: 0,
            public_ip: None,
            ice_servers: Vec::new(),
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
}

/// Flags of `encore serve` that override the configuration.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub record_dir: Option<PathBuf>,
    pub public_ip: Option<IpAddr>,
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
        let m = &mut self.media;
        if let Some(v) = env("ENCORE_PUBLIC_IP") {
            m.public_ip = Some(parse("media.public_ip", "ENCORE_PUBLIC_IP", v)?);
        }
        if let Some(v) = env("ENCORE_UDP_PORT_MIN") {
            m.udp_port_min = parse("media.udp_port_min", "ENCORE_UDP_PORT_MIN", v)?;
        }
        if let Some(v) = env("ENCORE_UDP_PORT_MAX") {
            m.udp_port_max = parse("media.udp_port_max", "ENCORE_UDP_PORT_MAX", v)?;
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
        let m = &self.media;
        if (m.udp_port_min == 0) != (m.udp_port_max == 0) || m.udp_port_min > m.udp_port_max {
            return Err(invalid(
                "media.udp_port_min",
                format!("and media.udp_port_max must both be 0 or a range, got {}..{}", m.udp_port_min, m.udp_port_max),
            ));
        }
        if m.bind_ips.is_empty() {
            return Err(invalid("media.bind_ips", "must name at least one address"));
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
    fn errors_name_the_key() {
        let cases: Vec<(&str, &str)> = vec![
            ("[server]\nlisten = \"nowhere\"\n", "listen"),
            ("[server]\nlistn = \"127.0.0.1:1\"\n", "listn"),
            ("[media]\nudp_port_min = 5000\n", "media.udp_port_min"),
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
    }
}
