//! The one place that orders the systems.

use bevy_ecs::schedule::{
    IntoScheduleConfigs, LogLevel, Schedule, ScheduleBuildSettings, ScheduleLabel, SingleThreadedExecutor,
};

use crate::dominant::dominant_speaker;
use crate::evict::evict;
use crate::ingest::ingest;
use crate::learn::learn;
use crate::playout::play_out;
use crate::recommend::recommend;
use crate::retransmit::retransmit;
use crate::route::route;
use crate::segment::segment;
use crate::stats::stats;
use crate::voice::detect_voice;

#[derive(ScheduleLabel, Clone, Debug, PartialEq, Eq, Hash)]
pub struct EngineTick;

/// The tick: eleven systems in one chain, on the single-threaded executor, with ambiguity
/// detection as an error (a chain has none; a system added outside it would).
pub fn build_schedule() -> Schedule {
    let mut schedule = Schedule::new(EngineTick);
    schedule.set_executor(SingleThreadedExecutor::new());
    schedule.set_build_settings(ScheduleBuildSettings {
        ambiguity_detection: LogLevel::Error,
        ..ScheduleBuildSettings::default()
    });
    schedule.add_systems(
        (ingest, detect_voice, dominant_speaker, segment, evict, recommend, route, learn, play_out, retransmit, stats)
            .chain(),
    );
    schedule
}
