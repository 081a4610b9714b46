//! Small operations more than one system performs.

use bevy_ecs::prelude::{Entity, World};

use encore_components::config::EngineConfig;
use encore_components::ids::{MediaKind, UtteranceId};
use encore_components::listener::Route;
use encore_components::output::{Event, KeyframeReason};
use encore_components::peer::Peer;
use encore_components::resources::{Counters, Directory, EngineClock, Outputs};
use encore_components::track::{KeyframeThrottle, Track};
use encore_components::utterance::Audience;

pub fn emit(world: &mut World, event: Event) {
    world.resource_mut::<Outputs>().out.events.push(event);
}

/// Takes the listener off its utterance (if any) and returns the utterance it played.
pub fn stop_playing(world: &mut World, session: Entity) -> Option<UtteranceId> {
    let playing = world.get_mut::<Route>(session)?.playing.take()?;
    if let Some(mut audience) = world.get_mut::<Audience>(playing.utterance) {
        audience.playing = audience.playing.saturating_sub(1);
    }
    Some(playing.id)
}

/// Asks the speaker's video tracks for a key frame, at most once per configured interval.
pub fn request_keyframe(
    world: &mut World,
    config: &EngineConfig,
    clock: &EngineClock,
    speaker: &str,
    reason: KeyframeReason,
) {
    // The speaker may have left since; then there is nobody to ask.
    let Some(peer) = world.resource::<Directory>().peers.get(speaker).copied() else { return };
    let Some(tracks) = world.get::<Peer>(peer).map(|p| p.tracks.clone()) else {
        return world_bug(world, "a peer in the directory has no Peer");
    };
    let interval_us = config.limits.keyframe_interval_ms * 1000;
    for track in tracks {
        let Some(name) = world.get::<Track>(track).filter(|t| t.media == MediaKind::Video).map(|t| t.name.clone())
        else {
            continue;
        };
        let Some(mut throttle) = world.get_mut::<KeyframeThrottle>(track) else {
            world_bug(world, "a video track has no KeyframeThrottle");
            continue;
        };
        if throttle.last_request_us.is_some_and(|last| clock.now_us < last + interval_us) {
            continue;
        }
        throttle.last_request_us = Some(clock.now_us);
        emit(world, Event::KeyframeRequest { track: name, reason });
    }
}

/// A lookup that cannot fail did: the engine has a bug (an entity in the directory without
/// its components, a route to an utterance that is gone). Debug builds stop here; release
/// builds count it in [`Counters::internal_errors`] and the caller skips the item, so one
/// broken entity never takes the room down.
#[track_caller]
pub fn bug(counters: &mut Counters, what: &'static str) {
    debug_assert!(false, "engine invariant broken: {what}");
    counters.internal_errors += 1;
}

/// [`bug`], for systems that hold the whole world.
#[track_caller]
pub fn world_bug(world: &mut World, what: &'static str) {
    bug(&mut world.resource_mut::<Counters>(), what);
}
