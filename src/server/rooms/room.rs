//! One room as its worker runs it: the engine, its peers' channels, its recorder.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use tokio::sync::mpsc;

use encore_systems::components::ids::{Name, PeerKey, Role};
use encore_systems::components::input::Input;
use encore_systems::components::output::{Event, SendPacket};
use encore_systems::{Engine, RoomView};

use super::worker::Pacer;
use super::{JoinedRoom, Moderation, PublisherControl, RoomCommand};
use crate::protocol::{ErrorBody, ErrorCode, Notice, PeerInfo};
use crate::server::recorder::Recorder;

/// Commands applied per room per tick at most (the rest wait for the next tick).
const MAX_COMMANDS_PER_TICK: usize = 20_000;

/// A peer's channels, as the room keeps them.
struct PeerSlot {
    uid: Option<String>,
    roles: Vec<Role>,
    events: mpsc::Sender<Notice>,
    media: Option<mpsc::Sender<SendPacket>>,
    publishing: bool,
}

/// One room on its worker.
pub struct Room {
    id: String,
    engine: Engine,
    rx: mpsc::Receiver<RoomCommand>,
    pacer: Pacer,
    peers: BTreeMap<Name, PeerSlot>,
    /// Media channel per listener key, filled on its first packet.
    media_by_key: HashMap<PeerKey, Option<mpsc::Sender<SendPacket>>>,
    /// Published tracks: their peer and their transport's control channel.
    publishers: BTreeMap<Name, (Name, mpsc::Sender<PublisherControl>)>,
    recorder: Option<Recorder>,
    closed: bool,
    skipped_ticks: u64,
    dropped_media: u64,
    dropped_events: u64,
}

impl Room {
    pub fn new(id: String, engine: Engine, rx: mpsc::Receiver<RoomCommand>, recorder: Option<Recorder>) -> Self {
        let pacer = Pacer::new(Instant::now(), engine.tick_us());
        Room {
            id,
            engine,
            rx,
            pacer,
            peers: BTreeMap::new(),
            media_by_key: HashMap::new(),
            publishers: BTreeMap::new(),
            recorder,
            closed: false,
            skipped_ticks: 0,
            dropped_media: 0,
            dropped_events: 0,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Every sender of commands is gone.
    pub fn channel_closed(&self) -> bool {
        self.rx.is_closed()
    }

    /// When the next tick is due.
    pub fn next_deadline(&self) -> Instant {
        self.pacer.deadline(self.engine.next_tick())
    }

    /// Runs the ticks whose time has come.
    pub fn run_due(&mut self, now: Instant) {
        let due = self.pacer.due(self.engine.next_tick(), now);
        if due.skipped > 0 {
            self.skipped_ticks += due.skipped;
            tracing::warn!(room = %self.id, skipped = due.skipped, "the worker fell behind; skipping ticks");
        }
        for _ in 0..due.run {
            if self.closed {
                return;
            }
            self.tick_once();
        }
    }

    fn push(&mut self, at: Instant, input: Input) {
        // The engine keeps arrival times monotonic and within the tick that applies them;
        // the recording gets the time the engine keeps.
        let at_us = self.engine.arrival_us(self.pacer.engine_us(at));
        if let Some(recorder) = &mut self.recorder
            && let Err(error) = recorder.input(at_us, self.engine.next_tick(), &input)
        {
            tracing::error!(room = %self.id, %error, "recording failed; recording stops");
            self.recorder = None;
        }
        self.engine.push(at_us, input);
    }

    fn tick_once(&mut self) {
        for _ in 0..MAX_COMMANDS_PER_TICK {
            match self.rx.try_recv() {
                Ok(command) => self.apply(command),
                Err(_) => break,
            }
            if self.closed {
                return;
            }
        }
        let mut output = self.engine.tick();
        if let Some(recorder) = &mut self.recorder
            && let Err(error) = recorder.tick(&self.engine, &output)
        {
            tracing::error!(room = %self.id, %error, "recording failed; recording stops");
            self.recorder = None;
        }
        for event in &output.events {
            self.notify(event);
        }
        for packet in output.packets.drain(..) {
            self.deliver(packet);
        }
        self.engine.recycle(output);
    }

    fn unique_name(&self, wanted: &str) -> Name {
        let base: String =
            wanted.chars().filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.')).take(32).collect();
        let base = if base.is_empty() { "peer".to_owned() } else { base };
        if !self.peers.contains_key(base.as_str()) && self.engine.peer_key(&base).is_none() {
            return Name::from(base);
        }
        (2..)
            .map(|n| format!("{base}-{n}"))
            .find(|name| !self.peers.contains_key(name.as_str()) && self.engine.peer_key(name).is_none())
            .map(Name::from)
            .unwrap_or_else(|| Name::new("peer"))
    }

    /// Counts a notice that did not reach its session: its queue was full (a slow client loses
    /// notices), not closed (a session that ended and is leaving loses nothing).
    fn count_undelivered(&mut self, error: mpsc::error::TrySendError<Notice>) {
        if let mpsc::error::TrySendError::Full(_) = error {
            self.dropped_events += 1;
        }
    }

    fn broadcast(&mut self, notice: Notice) {
        let mut undelivered = Vec::new();
        for slot in self.peers.values() {
            if let Err(error) = slot.events.try_send(notice.clone()) {
                undelivered.push(error);
            }
        }
        for error in undelivered {
            self.count_undelivered(error);
        }
    }

    fn tell(&mut self, peer: &str, notice: Notice) {
        if let Some(slot) = self.peers.get(peer)
            && let Err(error) = slot.events.try_send(notice)
        {
            self.count_undelivered(error);
        }
    }

    fn apply(&mut self, command: RoomCommand) {
        match command {
            RoomCommand::Join { at, name, uid, roles, events, reply } => {
                let peer = self.unique_name(&name);
                let peers = self
                    .peers
                    .iter()
                    .map(|(name, slot)| PeerInfo {
                        peer: name.to_string(),
                        uid: slot.uid.clone(),
                        roles: slot.roles.clone(),
                        publishing: slot.publishing,
                    })
                    .collect();
                self.push(at, Input::Join { peer: peer.clone(), uid: uid.clone(), roles: roles.clone() });
                self.broadcast(Notice::PeerJoined { peer: peer.to_string(), uid: uid.clone(), roles: roles.clone() });
                self.peers.insert(peer.clone(), PeerSlot { uid, roles, events, media: None, publishing: false });
                let _ = reply.send(JoinedRoom { peer, peers });
            }
            RoomCommand::Leave { at, peer } => {
                if let Some(slot) = self.peers.remove(&peer) {
                    self.push(at, Input::Leave { peer: peer.clone() });
                    self.media_by_key.clear();
                    self.publishers.retain(|_, (owner, _)| *owner != peer);
                    self.broadcast(Notice::PeerLeft { peer: peer.to_string(), uid: slot.uid, roles: slot.roles });
                }
            }
            RoomCommand::Input { at, input } => self.push(at, input),
            RoomCommand::Feedback { at, peer, utterance, signal, reply } => {
                let verdict = self.check_feedback(&peer, utterance.as_ref());
                if verdict.is_ok() {
                    self.push(at, Input::Feedback { peer, utterance, signal });
                }
                let _ = reply.send(verdict);
            }
            RoomCommand::AttachMedia { peer, media } => {
                if let Some(slot) = self.peers.get_mut(&peer) {
                    slot.media = Some(media);
                    self.media_by_key.clear();
                }
            }
            RoomCommand::DetachMedia { peer } => {
                if let Some(slot) = self.peers.get_mut(&peer) {
                    slot.media = None;
                    self.media_by_key.clear();
                }
            }
            RoomCommand::AttachPublisher { peer, track, control } => {
                self.publishers.insert(track, (peer, control));
            }
            RoomCommand::SetPublishing { peer, publishing } => {
                if let Some(slot) = self.peers.get_mut(&peer)
                    && slot.publishing != publishing
                {
                    slot.publishing = publishing;
                    self.broadcast(Notice::Publishing { peer: peer.to_string(), publishing });
                }
            }
            RoomCommand::Moderate { action, peer, by, reply } => {
                let _ = reply.send(self.moderate(action, &peer, &by));
            }
            RoomCommand::View { reply } => {
                let _ = reply.send(self.view());
            }
            RoomCommand::Close => {
                self.close();
            }
        }
    }

    /// Feedback must name an utterance this room had, or, without one, come from a listener
    /// that hears something now (as of the last tick).
    fn check_feedback(
        &self,
        peer: &str,
        utterance: Option<&encore_systems::components::UtteranceId>,
    ) -> Result<(), ErrorBody> {
        let Some(playing) = self.engine.listening(peer) else {
            return Err(ErrorBody::new(ErrorCode::Conflict, "feedback is for listeners: listen first"));
        };
        match (utterance, playing) {
            (Some(id), _) if !self.engine.utterance_existed(id) => {
                Err(ErrorBody::new(ErrorCode::NotFound, format!("no utterance {id} in this room")))
            }
            (None, None) => Err(ErrorBody::new(ErrorCode::NotFound, "nothing is playing; name the utterance")),
            _ => Ok(()),
        }
    }

    fn moderate(&mut self, action: Moderation, peer: &str, by: &str) -> Result<(), ErrorBody> {
        if !self.peers.contains_key(peer) {
            return Err(ErrorBody::new(ErrorCode::NotFound, format!("no peer {peer:?} in this room")));
        }
        let notice = match action {
            Moderation::Mute => Notice::Muted { by: by.to_owned() },
            Moderation::Remove => Notice::Removed { by: by.to_owned() },
        };
        self.tell(peer, notice);
        Ok(())
    }

    fn view(&mut self) -> RoomView {
        self.engine.view()
    }

    fn notify(&mut self, event: &Event) {
        match event {
            Event::UtteranceStart { utterance, speaker, uid, .. } => {
                let notice = Notice::UtteranceStarted {
                    utterance: utterance.clone(),
                    speaker: speaker.to_string(),
                    uid: uid.clone(),
                };
                self.broadcast(notice);
            }
            Event::UtteranceEnd { utterance, duration_us, reason, .. } => {
                let notice = Notice::UtteranceEnded {
                    utterance: utterance.clone(),
                    speaker: utterance.speaker.to_string(),
                    duration_ms: duration_us / 1000,
                    reason: *reason,
                };
                self.broadcast(notice);
            }
            Event::Route { listener, to, reason, lag_us, live, .. } => {
                // The speaker's uid while the speaker is in the room.
                let uid = to.as_ref().and_then(|id| self.peers.get(id.speaker.as_str())?.uid.clone());
                let notice = Notice::NowPlaying {
                    utterance: to.clone(),
                    speaker: to.as_ref().map(|id| id.speaker.to_string()),
                    uid,
                    live: *live,
                    lag_ms: lag_us.unwrap_or(0) / 1000,
                    reason: *reason,
                };
                self.tell(listener, notice);
            }
            Event::KeyframeRequest { track, .. } => {
                if let Some((_, control)) = self.publishers.get(track) {
                    let _ = control.try_send(PublisherControl::KeyframeRequest);
                }
            }
            Event::DominantSpeaker { speaker, .. } => {
                self.broadcast(Notice::DominantSpeaker { speaker: speaker.as_ref().map(|s| s.to_string()) });
            }
            Event::Evict { .. } | Event::Stats(_) => {}
        }
    }

    fn deliver(&mut self, packet: SendPacket) {
        let key = packet.listener;
        if !self.media_by_key.contains_key(&key) {
            let sender = self
                .engine
                .peer_name(key)
                .and_then(|name| self.peers.get(name.as_str()))
                .and_then(|slot| slot.media.clone());
            self.media_by_key.insert(key, sender);
        }
        if let Some(Some(media)) = self.media_by_key.get(&key)
            && media.try_send(packet).is_err()
        {
            self.dropped_media += 1;
        }
    }

    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(recorder) = &mut self.recorder
            && let Err(error) = recorder.flush()
        {
            tracing::error!(room = %self.id, %error, "flushing the recording failed");
        }
        tracing::info!(
            room = %self.id,
            ticks = self.engine.next_tick(),
            skipped_ticks = self.skipped_ticks,
            dropped_media = self.dropped_media,
            dropped_events = self.dropped_events,
            "room closed"
        );
    }
}
