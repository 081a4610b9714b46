//! Stable, readable identifiers.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A peer or track name as the input gave it. Cheap to clone, ordered by its text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<str>);

impl Name {
    pub fn new(text: &str) -> Self {
        Name(Arc::from(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Name {
    fn default() -> Self {
        Name::new("")
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Name {
    fn from(text: &str) -> Self {
        Name::new(text)
    }
}

impl From<String> for Name {
    fn from(text: String) -> Self {
        Name(Arc::from(text))
    }
}

impl std::ops::Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(Name::from(text))
    }
}

/// A peer's ordinal in the room: assigned in join order, never reused within an engine.
/// Output loops iterate peers in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerKey(pub u32);

/// An utterance's ordinal: assigned in the order utterances open, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UtteranceOrd(pub u64);

/// `<speaker>#<n>`: the speaker's name and the speaker's n-th utterance, counting from 1.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtteranceId {
    pub speaker: Name,
    pub n: u32,
}

impl fmt::Display for UtteranceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.speaker, self.n)
    }
}

impl fmt::Debug for UtteranceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Why a text is not an utterance id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("utterance id must look like <speaker>#<n> with n >= 1, got {0:?}")]
pub struct BadUtteranceId(pub String);

impl FromStr for UtteranceId {
    type Err = BadUtteranceId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadUtteranceId(text.to_owned());
        let (speaker, n) = text.rsplit_once('#').ok_or_else(bad)?;
        if speaker.is_empty() {
            return Err(bad());
        }
        let n: u32 = n.parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(bad());
        }
        Ok(UtteranceId { speaker: Name::new(speaker), n })
    }
}

impl Serialize for UtteranceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UtteranceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Audio,
    Video,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }
}

/// What a peer may do. Everyone may listen; `speaker` and `admin` may publish; `moderator`
/// and `admin` may also mute and remove others (at the signaling layer). A moderator who
/// should speak too carries both roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Speaker,
    Listener,
    Moderator,
    Admin,
}

impl Role {
    pub fn may_publish(self) -> bool {
        matches!(self, Role::Speaker | Role::Admin)
    }

    pub fn may_listen(self) -> bool {
        true
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Speaker => "speaker",
            Role::Listener => "listener",
            Role::Moderator => "moderator",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "speaker" => Ok(Role::Speaker),
            "listener" => Ok(Role::Listener),
            "moderator" => Ok(Role::Moderator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (expected speaker, listener, moderator or admin)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utterance_id_round_trips_and_rejects_garbage() {
        let id: UtteranceId = "alice#3".parse().unwrap();
        assert_eq!(id.speaker.as_str(), "alice");
        assert_eq!(id.n, 3);
        assert_eq!(id.to_string(), "alice#3");
        // A name may itself contain '#': the last one separates the counter.
        let id: UtteranceId = "a#b#12".parse().unwrap();
        assert_eq!(id.speaker.as_str(), "a#b");
        for bad in ["alice", "#3", "alice#0", "alice#", "alice#x", "alice#-1"] {
            assert!(bad.parse::<UtteranceId>().is_err(), "{bad} must not parse");
        }
    }

    #[test]
    fn utterance_ids_order_by_speaker_then_number() {
        let a1: UtteranceId = "a#1".parse().unwrap();
        let a2: UtteranceId = "a#2".parse().unwrap();
        let b1: UtteranceId = "b#1".parse().unwrap();
        assert!(a1 < a2 && a2 < b1);
    }
}
