//! Worker threads, each running its rooms' ticks on time.
//!
//! Missed-tick policy ([`Pacer`]): a worker that wakes late runs the missed ticks back to back
//! (a burst of packets, as after network jitter), at most [`MAX_CATCH_UP_TICKS`] per wake-up; a
//! room further behind than that skips the rest (its clock is moved forward, the stall is not
//! replayed) and the skip is counted and logged. Inputs are recorded with the tick that
//! consumed them, so a recording replays exactly whatever the worker's timing was.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::room::Room;
use crate::metrics::WorkerMetrics;

/// Missed ticks a room runs back to back in one wake-up before it skips the rest.
pub const MAX_CATCH_UP_TICKS: u64 = 100;

/// A room's clock against the wall clock: which ticks are due, and when the next one is.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// The instant of engine time 0 (moved forward by skipped ticks).
    start: Instant,
    tick_us: u64,
}

/// What a wake-up should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Ticks to run now, back to back.
    pub run: u64,
    /// Ticks given up (the room's clock moved past them).
    pub skipped: u64,
}

impl Pacer {
    pub fn new(start: Instant, tick_us: u64) -> Self {
        Pacer { start, tick_us: tick_us.max(1) }
    }

    /// The ticks due at `now` when the engine's next tick is `next`: every tick whose time
    /// has come, at most [`MAX_CATCH_UP_TICKS`]; past that the rest are skipped.
    pub fn due(&mut self, next: u64, now: Instant) -> Due {
        let elapsed_us = now.saturating_duration_since(self.start).as_micros() as u64;
        let last_due = elapsed_us / self.tick_us;
        if last_due < next {
            return Due { run: 0, skipped: 0 };
        }
        let behind = last_due + 1 - next;
        if behind <= MAX_CATCH_UP_TICKS {
            return Due { run: behind, skipped: 0 };
        }
        let skipped = behind - MAX_CATCH_UP_TICKS;
        self.start += Duration::from_micros(skipped * self.tick_us);
        Due { run: MAX_CATCH_UP_TICKS, skipped }
    }

    /// When tick `next` is due.
    pub fn deadline(&self, next: u64) -> Instant {
        self.start + Duration::from_micros(next * self.tick_us)
    }

    /// An instant on the engine's clock (microseconds since engine time 0).
    pub fn engine_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }
}

/// A worker thread: receives rooms on `control`, runs their due ticks, sleeps until the
/// earliest next deadline or a new room.
pub fn run(index: usize, control: std::sync::mpsc::Receiver<Room>, stopping: Arc<AtomicBool>, metrics: WorkerMetrics) {
    let mut rooms: Vec<Room> = Vec::new();
    loop {
        let now = Instant::now();
        let mut queued = 0;
        for room in rooms.iter_mut() {
            let skipped = room.run_due(now);
            if skipped > 0 {
                metrics.skipped_ticks(skipped);
            }
            queued += room.queued();
            if !room.is_closed() && stopping.load(Ordering::Relaxed) && room.channel_closed() {
                room.close();
            }
        }
        metrics.queue_depth(queued);
        rooms.retain(|room| !room.is_closed());
        if stopping.load(Ordering::Relaxed) && rooms.is_empty() {
            // Drain rooms still arriving, then stop.
            while let Ok(mut room) = control.try_recv() {
                room.close();
            }
            tracing::debug!(worker = index, "worker stopped");
            return;
        }
        let wait = rooms
            .iter()
            .map(Room::next_deadline)
            .min()
            .map_or(Duration::from_millis(100), |deadline| deadline.saturating_duration_since(Instant::now()));
        match control.recv_timeout(wait) {
            Ok(room) => rooms.push(room),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if rooms.is_empty() {
                    return;
                }
                std::thread::sleep(wait);
            }
        }
    }
}

/// The missed-tick policy on synthetic instants, one timeline per test (as tokio tests its
/// `Interval`): each line is a wake-up at `t` with the engine's next tick, and what is due.
#[cfg(test)]
mod tests {
    use super::*;

    const TICK_US: u64 = 10_000;

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Wakes the pacer at each `(ms, expected run, expected skipped)` and runs what is due.
    fn timeline(steps: &[(u64, u64, u64)]) -> (Pacer, u64, Instant) {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0, TICK_US);
        let mut next = 0;
        for &(at, run, skipped) in steps {
            let due = pacer.due(next, ms(t0, at));
            assert_eq!(due, Due { run, skipped }, "woken at {at} ms with tick {next} next");
            next += due.run;
        }
        (pacer, next, t0)
    }

    #[test]
    fn on_time_wake_ups_run_one_tick_each() {
        //   t (ms):  0    10   20   25   30
        //   ticks:   0    1    2    -    3
        let (pacer, next, t0) = timeline(&[(0, 1, 0), (10, 1, 0), (20, 1, 0), (25, 0, 0), (30, 1, 0)]);
        assert_eq!(next, 4);
        assert_eq!(pacer.deadline(next), ms(t0, 40));
    }

    #[test]
    fn a_late_wake_up_runs_the_missed_ticks_back_to_back() {
        //   t (ms):  0    57 (ticks 1..=5 at once)    60
        let (pacer, next, t0) = timeline(&[(0, 1, 0), (57, 5, 0), (60, 1, 0)]);
        assert_eq!(next, 7);
        assert_eq!(pacer.deadline(next), ms(t0, 70), "the schedule is not moved by a catch-up");
    }

    #[test]
    fn a_long_stall_skips_what_is_past_the_catch_up_bound() {
        // Stalled 2.5 s after tick 0: 250 ticks due, 100 run, 150 skipped; the clock moves
        // 1.5 s forward, so the next deadline is one tick after the wake-up, not in the past.
        let (pacer, next, t0) = timeline(&[(0, 1, 0), (2_505, 100, 150)]);
        assert_eq!(next, 101);
        assert_eq!(pacer.deadline(next), ms(t0, 2_510));
        assert_eq!(pacer.engine_us(ms(t0, 2_505)), 1_005_000, "engine time lost the skipped ticks");
    }

    #[test]
    fn waking_early_runs_nothing() {
        let (pacer, next, t0) = timeline(&[(0, 1, 0), (3, 0, 0), (9, 0, 0)]);
        assert_eq!(next, 1);
        assert_eq!(pacer.deadline(next), ms(t0, 10));
    }
}
