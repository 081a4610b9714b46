//! Worker threads, each running its rooms' ticks on time and their media I/O.
//!
//! Missed-tick policy ([`Pacer`]): a worker that wakes late runs the missed ticks back to back
//! (a burst of packets, as after network jitter), at most [`MAX_CATCH_UP_TICKS`] per wake-up; a
//! room further behind than that skips the rest (its clock is moved forward, the stall is not
//! replayed) and the skip is counted and logged. Inputs are recorded with the tick that
//! consumed them, so a recording replays exactly whatever the worker's timing was.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::WorkerStats;
use super::room::Room;
use crate::metrics::WorkerMetrics;
use crate::server::media::{MediaEvent, MediaIo, MediaStats};

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

/// A worker's wake-up call: raised by whatever has work for one of its rooms (a command in a
/// room's queue, an edge room's relay lines, a key frame an edge asked of an origin room).
/// The first raise since the worker last looked also writes an eventfd the worker's poll
/// waits on, so the worker wakes at once rather than at its next timeout.
pub struct Wake {
    flag: AtomicBool,
    fd: std::os::fd::OwnedFd,
}

impl Wake {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd takes no pointers; its result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Wake { flag: AtomicBool::new(false), fd })
    }

    /// There is work: the worker looks at every room at its next turn, which comes now.
    pub fn raise(&self) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: an 8-byte write from a u64 to our own eventfd. It cannot fail but by an
            // overflowing count, which a reader drains long before.
            unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&self.fd), (&one as *const u64).cast(), 8) };
        }
    }

    /// Whether it was raised since the last call (and the eventfd drained). The eventfd is
    /// drained before the flag is taken: a raise between the two finds the flag still up and
    /// writes nothing, and its work is taken with the flag now.
    pub fn take(&self) -> bool {
        if !self.flag.load(Ordering::Acquire) {
            return false;
        }
        let mut count: u64 = 0;
        // SAFETY: an 8-byte read into a u64 from our own non-blocking eventfd.
        unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(&self.fd), (&mut count as *mut u64).cast(), 8) };
        self.flag.swap(false, Ordering::AcqRel)
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }
}

/// Longest a worker sleeps with nothing due: it also picks up new rooms when it wakes.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// How often a worker looks at every room even without a flag: a room's new buffer share
/// (the budget's thread rebalances once a second) waits at most this long.
const LOOK_ALL_EVERY: Duration = Duration::from_secs(1);
/// How often a worker sums up in its log what its media path dropped (when it dropped anything):
/// one line a minute, however much junk arrives.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(60);

/// A worker thread: owns its media socket and its rooms. Each turn it reads what arrived (and
/// hands it to the rooms as engine inputs), runs the rooms' due ticks (their packets become
/// SRTP datagrams on the same thread), sends everything in one batch, and sleeps until a
/// datagram arrives or the next deadline (a tick, a connection's timer).
pub fn run(
    index: usize,
    control: std::sync::mpsc::Receiver<Room>,
    stopping: Arc<AtomicBool>,
    wake: Arc<Wake>,
    mut media: MediaIo,
    stats: Arc<Vec<Mutex<WorkerStats>>>,
    metrics: WorkerMetrics,
) {
    let mut rooms: BTreeMap<u64, Room> = BTreeMap::new();
    let mut io_errors = 0u64;
    let mut reported = (Instant::now(), media.stats());
    let mut counted = media.stats();
    // When each room has something due next: a worker visits the rooms whose time came, and
    // those a datagram, a connection event or a command concerns, not every room at every
    // wake-up (1 000 sleeping rooms would cost a good part of a core just being looked at).
    let mut schedule: BTreeSet<(Instant, u64)> = BTreeSet::new();
    let mut deadline_of: HashMap<u64, Instant> = HashMap::new();
    let mut look_all_at = Instant::now();
    loop {
        let mut visit: BTreeSet<u64> = BTreeSet::new();
        while let Ok(room) = control.try_recv() {
            visit.insert(room.serial());
            rooms.insert(room.serial(), room);
        }
        let now = Instant::now();
        if let Err(error) = media.poll_input(now) {
            // An error of the socket itself (not of a datagram): say so now and then.
            io_errors += 1;
            if io_errors.is_power_of_two() {
                tracing::warn!(worker = index, %error, count = io_errors, "reading the media socket failed");
            }
        }
        media.collect(now);
        while let Some(event) = media.poll_event() {
            let owner = owner_of(&event);
            visit.insert(owner);
            if let Some(room) = rooms.get_mut(&owner) {
                room.media_event(event, &mut media);
            }
        }
        let now = Instant::now();
        let stop = stopping.load(Ordering::Relaxed);
        // A command for some room (its queue raised the flag), the stop, or now and then (a
        // new buffer share raises no flag): every room is looked at.
        let all = wake.take() || stop || now >= look_all_at;
        if all {
            look_all_at = now + LOOK_ALL_EVERY;
            visit.extend(rooms.keys().copied());
        } else {
            while let Some(&(at, serial)) = schedule.first() {
                if at > now {
                    break;
                }
                schedule.pop_first();
                visit.insert(serial);
            }
        }
        let mut queued = 0;
        for serial in &visit {
            let Some(room) = rooms.get_mut(serial) else { continue };
            let skipped = room.run_due(now, &mut media);
            if skipped > 0 {
                metrics.skipped_ticks(skipped);
            }
            queued += room.queued();
            if !room.is_closed() && stop && room.channel_closed() {
                room.close(&mut media);
            }
        }
        if all {
            metrics.queue_depth(queued);
        }
        media.collect(Instant::now());
        media.flush();
        // Events raised by the ticks' own writes and closes (a room's closed connections).
        while let Some(event) = media.poll_event() {
            let owner = owner_of(&event);
            visit.insert(owner);
            if let Some(room) = rooms.get_mut(&owner) {
                room.media_event(event, &mut media);
            }
        }
        for serial in &visit {
            let Some(room) = rooms.get_mut(serial) else { continue };
            let at = room.next_deadline();
            if let Some(old) = deadline_of.insert(*serial, at) {
                schedule.remove(&(old, *serial));
            }
            schedule.insert((at, *serial));
        }
        let before = rooms.len();
        rooms.retain(|serial, room| {
            let open = !room.is_closed();
            if !open && let Some(at) = deadline_of.remove(serial) {
                schedule.remove(&(at, *serial));
            }
            open
        });
        if rooms.len() < before {
            // A closed room's buffer went back to this thread's heap; give what is free at
            // the top of it back to the system (docs/operations.md, "Memory").
            trim_heap();
        }
        if let Some(slot) = stats.get(index) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) =
                WorkerStats { media: media.stats(), connections: media.connections() };
        }
        let now_stats = media.stats();
        crate::metrics::media_dropped(drop_counts(&counted, &now_stats));
        counted = now_stats;
        if reported.0.elapsed() >= DROP_REPORT_EVERY {
            report_drops(index, &reported.1, &media.stats());
            reported = (Instant::now(), media.stats());
        }
        if stop && rooms.is_empty() {
            while let Ok(mut room) = control.try_recv() {
                room.close(&mut media);
            }
            media.collect(Instant::now());
            media.flush();
            tracing::debug!(worker = index, "worker stopped");
            return;
        }
        let now = Instant::now();
        let next = schedule.first().map(|(at, _)| *at).into_iter().chain(media.next_deadline()).min();
        let wait = next.map_or(IDLE_WAIT, |at| at.saturating_duration_since(now)).min(IDLE_WAIT);
        if !wait.is_zero()
            && let Err(error) = media.wait(wait, wake.fd())
        {
            io_errors += 1;
            if io_errors.is_power_of_two() {
                tracing::warn!(worker = index, %error, count = io_errors, "waiting on the media socket failed");
            }
            std::thread::sleep(wait);
        }
    }
}

/// Returns the heap's free memory to the system where the allocator can (glibc keeps freed
/// memory in its arenas otherwise, and the resident size stays at its peak after a flood).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the media path dropped between two readings, by `metrics::MEDIA_DROP_CAUSES`.
fn drop_counts(before: &MediaStats, now: &MediaStats) -> [u64; 11] {
    let delta = |a: u64, b: u64| b.saturating_sub(a);
    [
        delta(before.drop_unknown_source, now.drop_unknown_source),
        delta(before.drop_stun_no_username, now.drop_stun_no_username),
        delta(before.drop_stun_unknown_ufrag, now.drop_stun_unknown_ufrag),
        delta(before.drop_stun_bad_integrity, now.drop_stun_bad_integrity),
        delta(before.drop_truncated, now.drop_truncated),
        delta(before.drop_rtc_error, now.drop_rtc_error),
        delta(before.drop_tcp_unbound, now.drop_tcp_unbound),
        delta(before.drop_tcp_overflow, now.drop_tcp_overflow),
        delta(before.drop_dtls, now.drop_dtls),
        delta(before.drop_srtcp, now.drop_srtcp),
        delta(before.drop_listener_rtp, now.drop_listener_rtp),
    ]
}

/// One log line with what the media path dropped since `before`, by cause, if anything.
fn report_drops(worker: usize, before: &MediaStats, now: &MediaStats) {
    let [
        unknown_source,
        stun_no_username,
        stun_unknown_ufrag,
        stun_bad_integrity,
        truncated,
        refused_by_rtc,
        tcp_unbound,
        tcp_overflow,
        dtls,
        srtcp,
        listener_rtp,
    ] = drop_counts(before, now);
    let stun = stun_no_username + stun_unknown_ufrag + stun_bad_integrity;
    let tcp = tcp_unbound + tcp_overflow;
    let send_errors = now.tx_errors.saturating_sub(before.tx_errors);
    if unknown_source + stun + refused_by_rtc + truncated + tcp + dtls + srtcp + listener_rtp + send_errors > 0 {
        tracing::info!(
            worker,
            unknown_source,
            stun,
            refused_by_rtc,
            dtls,
            srtcp,
            listener_rtp,
            truncated,
            tcp,
            send_errors,
            "media datagrams dropped in the last minute"
        );
    }
}

fn owner_of(event: &MediaEvent) -> u64 {
    match event {
        MediaEvent::Connected { owner, .. }
        | MediaEvent::Closed { owner, .. }
        | MediaEvent::TrackOpen { owner, .. }
        | MediaEvent::Rtp { owner, .. }
        | MediaEvent::Feedback { owner, .. } => *owner,
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
