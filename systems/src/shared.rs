//! Small operations more than one system performs.

use bevy_ecs::prelude::{Entity, World};

use encore_components::config::EngineConfig;
use encore_components::ids::{MediaKind, UtteranceId};
use encore_components::output::{Event, KeyframeReason};
use encore_components::peer::Peer;
use encore_components::resources::{Clock, Directory, Outputs};
use encore_components::track::{KeyframeThrottle, Track};
use encore_components::utterance::Audience;
use encore_components::viewer::Route;

pub fn emit(world: &mut World, event: Event) {
    world.resource_mut::<Outputs>().out.events.push(event);
}

/// Takes the listener off its utterance (if any) and returns the utterance it played.
pub fn stop_playing(world: &mut World, viewer: Entity) -> Option<UtteranceId> {
    let playing = world.get_mut::<Route>(viewer)?.playing.take()?;
    if let Some(mut audience) = world.get_mut::<Audience>(playing.utterance) {
        audience.playing = audience.playing.saturating_sub(1);
    }
    Some(playing.id)
}

/// Asks the speaker's video tracks for a key frame, at most once per configured interval.
pub fn request_keyframe(
    world: &mut World,
    config: &EngineConfig,
    clock: &Clock,
    speaker: &str,
    reason: KeyframeReason,
) {
    let Some(peer) = world.resource::<Directory>().peers.get(speaker).copied() else { return };
    let Some(tracks) = world.get::<Peer>(peer).map(|p| p.tracks.clone()) else { return };
    let interval_us = config.limits.keyframe_interval_ms * 1000;
    for track in tracks {
        let Some(name) = world.get::<Track>(track).filter(|t| t.media == MediaKind::Video).map(|t| t.name.clone())
        else {
            continue;
        };
        let Some(mut throttle) = world.get_mut::<KeyframeThrottle>(track) else { continue };
        if throttle.last_request_us.is_some_and(|last| clock.now_us < last + interval_us) {
            continue;
        }
        throttle.last_request_us = Some(clock.now_us);
        emit(world, Event::KeyframeRequest { track: name, reason });
    }
}
