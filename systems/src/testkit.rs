//! A virtual-time room for the systems' tests: scripted peers, synthetic RTP, and the
//! engine ticked up to a time, collecting the trace and every sent packet.

use std::collections::BTreeMap;
use std::sync::Arc;

use encore_components::config::EngineConfig;
use encore_components::ids::{MediaKind, Name, Role, UtteranceId};
use encore_components::input::{Input, RtpIn};
use encore_components::output::{EndReason, Event, RouteReason, SendPacket};
use encore_components::resources::Directory;
use encore_components::utterance::PacketBuffer;

use crate::Engine;

pub struct Room {
    pub engine: Engine,
    inputs: Vec<(u64, Input)>,
    next_seq: BTreeMap<String, u16>,
    pub trace: Vec<(u64, Event)>,
    /// Every packet sent, with the engine time of the tick that sent it.
    pub sent: Vec<(u64, SendPacket)>,
    /// Largest buffer byte count seen at the end of a tick.
    pub max_buffer_bytes: u64,
}

impl Room {
    pub fn new(config: EngineConfig) -> Self {
        Room {
            engine: Engine::new(config).expect("valid config"),
            inputs: Vec::new(),
            next_seq: BTreeMap::new(),
            trace: Vec::new(),
            sent: Vec::new(),
            max_buffer_bytes: 0,
        }
    }

    pub fn push(&mut self, at_us: u64, input: Input) {
        self.inputs.push((at_us, input));
    }

    pub fn speaker(&mut self, peer: &str, track: &str) {
        self.push(0, Input::Join { peer: Name::new(peer), uid: None, roles: vec![Role::Speaker] });
        self.push(
            0,
            Input::Publish {
                peer: Name::new(peer),
                track: Name::new(track),
                media: MediaKind::Audio,
                codec: "opus".into(),
                clock_rate: 48_000,
                ssrc: 1,
            },
        );
    }

    pub fn video(&mut self, peer: &str, track: &str) {
        self.push(
            0,
            Input::Publish {
                peer: Name::new(peer),
                track: Name::new(track),
                media: MediaKind::Video,
                codec: "vp8".into(),
                clock_rate: 90_000,
                ssrc: 2,
            },
        );
    }

    pub fn listener(&mut self, peer: &str) {
        self.push(0, Input::Join { peer: Name::new(peer), uid: None, roles: vec![Role::Listener] });
        self.push(0, Input::Listen { peer: Name::new(peer) });
    }

    fn packet(&mut self, track: &str, at_us: u64, clock_rate: u64, level: Option<u8>, size: usize, keyframe: bool) {
        let seq = self.next_seq.entry(track.to_owned()).or_insert(1000);
        *seq = seq.wrapping_add(1);
        let packet = RtpIn {
            seq: *seq,
            ts: (at_us * clock_rate / 1_000_000) as u32,
            marker: false,
            payload: Arc::from(vec![(*seq % 251) as u8; size]),
            audio_level: level,
            voice: None,
            keyframe,
        };
        self.push(at_us, Input::Rtp { track: Name::new(track), packet });
    }

    /// Voiced 20 ms Opus packets of 160 bytes from `from_us` until before `to_us`.
    pub fn talk(&mut self, track: &str, from_us: u64, to_us: u64) {
        for at in (from_us..to_us).step_by(20_000) {
            self.packet(track, at, 48_000, Some(30), 160, false);
        }
    }

    /// 20 ms packets at an RFC 6464 level (0 loudest, 127 silence), 120 bytes each.
    pub fn sound(&mut self, track: &str, from_us: u64, to_us: u64, level: u8) {
        for at in (from_us..to_us).step_by(20_000) {
            self.packet(track, at, 48_000, Some(level), 120, false);
        }
    }

    /// Silent 20 ms packets (level 100).
    pub fn silence(&mut self, track: &str, from_us: u64, to_us: u64) {
        for at in (from_us..to_us).step_by(20_000) {
            self.packet(track, at, 48_000, Some(100), 40, false);
        }
    }

    /// One packet per 30 fps frame; the first frame at or after `keyframe_at_us` is a key
    /// frame.
    pub fn video_frames(&mut self, track: &str, from_us: u64, to_us: u64, keyframe_at_us: u64) {
        let mut key_sent = false;
        for at in (from_us..to_us).step_by(33_333) {
            let keyframe = !key_sent && at >= keyframe_at_us;
            key_sent |= keyframe;
            self.packet(track, at, 90_000, None, 900, keyframe);
        }
    }

    /// Ticks until the engine time passes `until_us`, feeding each input in the first tick
    /// at or after its arrival. Returns the whole trace so far: each event with its tick.
    pub fn run_until(&mut self, until_us: u64) -> Vec<(u64, Event)> {
        self.inputs.sort_by_key(|(at, _)| *at);
        let mut rest = std::mem::take(&mut self.inputs).into_iter().peekable();
        while self.engine.next_tick_us() <= until_us {
            let now = self.engine.next_tick_us();
            while let Some((at, input)) = rest.next_if(|(at, _)| *at <= now) {
                self.engine.push(at, input);
            }
            let mut out = self.engine.tick();
            let now = out.now_us;
            let tick = out.tick;
            self.trace.extend(out.events.drain(..).map(|event| (tick, event)));
            self.sent.extend(out.packets.drain(..).map(|p| (now, p)));
            self.engine.recycle(out);
            self.max_buffer_bytes = self.max_buffer_bytes.max(self.engine.buffer_bytes());
            assert!(self.engine.buffer_bytes() <= self.engine.buffer_cap(), "cap broken at {now}");
        }
        self.inputs = rest.collect();
        self.trace.clone()
    }

    pub fn buffer_of(&mut self, id: &str) -> PacketBuffer {
        let id: UtteranceId = id.parse().unwrap();
        let world = &self.engine.world;
        let directory = world.resource::<Directory>();
        let ord = directory.utterance_ids[&id];
        world.get::<PacketBuffer>(directory.utterances[&ord]).unwrap().clone()
    }
}

/// A route change as the tests compare it: (tick, from, to, reason), ids as text.
pub type RouteLine = (u64, Option<String>, Option<String>, RouteReason);

/// The route changes of one listener, in order.
pub fn routes(trace: &[(u64, Event)], listener: &str) -> Vec<RouteLine> {
    trace
        .iter()
        .filter_map(|(tick, event)| match event {
            Event::Route { listener: who, from, to, reason, .. } if who.as_str() == listener => {
                Some((*tick, from.as_ref().map(|id| id.to_string()), to.as_ref().map(|id| id.to_string()), *reason))
            }
            _ => None,
        })
        .collect()
}

/// The utterances that opened: (tick, id, started_us, the one it continues).
pub fn starts(trace: &[(u64, Event)]) -> Vec<(u64, String, u64, Option<String>)> {
    trace
        .iter()
        .filter_map(|(tick, event)| match event {
            Event::UtteranceStart { utterance, started_us, continues, .. } => {
                Some((*tick, utterance.to_string(), *started_us, continues.as_ref().map(|id| id.to_string())))
            }
            _ => None,
        })
        .collect()
}

/// The utterances that closed: (id, duration_us, reason).
pub fn ends(trace: &[(u64, Event)]) -> Vec<(String, u64, EndReason)> {
    trace
        .iter()
        .filter_map(|(_, event)| match event {
            Event::UtteranceEnd { utterance, duration_us, reason, .. } => {
                Some((utterance.to_string(), *duration_us, *reason))
            }
            _ => None,
        })
        .collect()
}

/// The evictions: (utterance, whole, listeners cut over or rerouted).
pub fn evictions(trace: &[(u64, Event)]) -> Vec<(String, bool, u64)> {
    trace
        .iter()
        .filter_map(|(_, event)| match event {
            Event::Evict { utterance, whole, listeners, .. } => Some((utterance.to_string(), *whole, *listeners)),
            _ => None,
        })
        .collect()
}

/// Shorthand for an expected route line.
pub fn route(tick: u64, from: Option<&str>, to: Option<&str>, reason: RouteReason) -> RouteLine {
    (tick, from.map(str::to_owned), to.map(str::to_owned), reason)
}
