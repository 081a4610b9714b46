//! One buffer budget for the whole server, shared by its rooms.
//!
//! The product promises at most `engine.buffer_max_bytes` (1 GB by default) of buffered media
//! in all, not per room. Each room's engine holds its buffer under a cap that the budget gives
//! it, as an engine input (`buffer_share`) that the recorder records, so a replay of the room
//! is exact whatever the other rooms did.
//!
//! - **Floor.** Every room is sure of `budget / (4 * max_rooms)` (250 KB with the defaults:
//!   about a minute of one speaker's Opus), so a new room starts at once with its floor, and
//!   the floors of all the rooms there could be take at most a quarter of the budget.
//! - **Shares.** Every [`REBALANCE_EVERY`] the rest is split by demand, max-min fair: a room
//!   wants what it holds plus [`DEMAND_HORIZON_S`] seconds of what came into its buffer in the
//!   last period; rooms wanting less than an even split get what they want, the others split
//!   what is left evenly.
//! - **Never over, even in passing.** A room whose share shrinks applies the new cap at its
//!   next tick (evicting in the documented order); until it says it has, the budget counts
//!   its old share. A room's share grows only out of what no room holds or is counted for.
//!   So the caps, and the buffers under them, never sum past the budget.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

/// How often shares follow demand.
pub const REBALANCE_EVERY: Duration = Duration::from_secs(1);
/// A room wants what it holds plus this many seconds of its recent intake.
pub const DEMAND_HORIZON_S: u64 = 10;

/// What a room and the budget share: the budget writes `granted`, the room's worker the rest,
/// after each tick.
#[derive(Debug, Default)]
pub struct RoomShare {
    /// The cap the budget gives the room; the room applies it at its next tick.
    granted: AtomicU64,
    /// The cap the room's engine holds its buffer to, as of its last tick.
    applied: AtomicU64,
    /// The room's buffer, and the bytes that ever came into it, as of its last tick.
    bytes: AtomicU64,
    added: AtomicU64,
    closed: AtomicBool,
}

impl RoomShare {
    /// The cap the room should hold its buffer to now.
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Acquire)
    }

    /// After a tick: the cap the engine applied and where its buffer stands.
    pub fn report(&self, applied: u64, bytes: u64, added: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.added.store(added, Ordering::Relaxed);
        self.applied.store(applied, Ordering::Release);
    }

    /// The room is gone: its share goes back to the budget.
    pub fn close(&self) {
        self.bytes.store(0, Ordering::Relaxed);
        self.closed.store(true, Ordering::Release);
    }
}

struct Tracked {
    share: Arc<RoomShare>,
    /// `added` at the last rebalance, for the intake since.
    added_before: u64,
}

/// The server's buffer budget and every room's share of it.
pub struct Budget {
    total: u64,
    floor: u64,
    max_rooms: usize,
    rooms: Mutex<BTreeMap<u64, Tracked>>,
}

/// The budget as it stands, for `/api/rooms` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BudgetView {
    /// `engine.buffer_max_bytes`: every room's buffer together stays under it.
    pub budget_bytes: u64,
    /// What every room is sure of.
    pub floor_bytes: u64,
    /// Every room's buffer, summed.
    pub buffered_bytes: u64,
    /// Every room's share, summed (what the rooms may hold).
    pub granted_bytes: u64,
    /// Each room's buffer and share, by room serial.
    #[serde(skip)]
    pub rooms: BTreeMap<u64, (u64, u64)>,
}

impl Budget {
    pub fn new(total: u64, max_rooms: usize) -> Arc<Self> {
        let floor = total / (4 * max_rooms.max(1) as u64);
        Arc::new(Budget { total, floor, max_rooms: max_rooms.max(1), rooms: Mutex::new(BTreeMap::new()) })
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Tracked>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new room's share: its floor, which is always free (see the module doc).
    pub fn admit(&self, serial: u64) -> Arc<RoomShare> {
        let share = Arc::new(RoomShare::default());
        share.granted.store(self.floor, Ordering::Release);
        share.applied.store(self.floor, Ordering::Release);
        self.rooms().insert(serial, Tracked { share: share.clone(), added_before: 0 });
        share
    }

    /// Moves the shares toward the rooms' demands (see the module doc); closed rooms leave.
    pub fn rebalance(&self) {
        let mut rooms = self.rooms();
        rooms.retain(|_, room| !room.share.closed.load(Ordering::Acquire));
        let mut states = Vec::with_capacity(rooms.len());
        for room in rooms.values_mut() {
            let added = room.share.added.load(Ordering::Relaxed);
            let intake = added.saturating_sub(room.added_before);
            room.added_before = added;
            let bytes = room.share.bytes.load(Ordering::Relaxed);
            states.push(ShareState {
                demand: bytes.saturating_add(intake.saturating_mul(DEMAND_HORIZON_S)),
                granted: room.share.granted.load(Ordering::Acquire),
                applied: room.share.applied.load(Ordering::Acquire),
            });
        }
        // The floors of the rooms not made yet stay free, so a new room always has its floor.
        let reserved = self.floor * self.max_rooms.saturating_sub(rooms.len()) as u64;
        let available = self.total.saturating_sub(reserved);
        let granted = next_grants(available, self.floor, &states);
        for (room, grant) in rooms.values().zip(granted) {
            room.share.granted.store(grant, Ordering::Release);
        }
    }

    /// The budget and every room's place in it. Read under the budget's lock, so no share
    /// moves while the rooms are read.
    pub fn view(&self) -> BudgetView {
        let rooms = self.rooms();
        let mut view = BudgetView { budget_bytes: self.total, floor_bytes: self.floor, ..BudgetView::default() };
        for (serial, room) in rooms.iter() {
            if room.share.closed.load(Ordering::Acquire) {
                continue;
            }
            let bytes = room.share.bytes.load(Ordering::Relaxed);
            let granted = room.share.granted.load(Ordering::Acquire);
            view.buffered_bytes += bytes;
            view.granted_bytes += granted;
            view.rooms.insert(*serial, (bytes, granted));
        }
        view
    }
}

/// One room, as a rebalance sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ShareState {
    demand: u64,
    granted: u64,
    applied: u64,
}

impl ShareState {
    /// What the room may hold until it applies its grant: the larger of the two caps.
    fn counted(&self) -> u64 {
        self.granted.max(self.applied)
    }
}

/// Max-min fair split of `available` over the demands, each at least `floor` (the caller
/// makes sure `available` covers every floor).
fn fair_targets(available: u64, floor: u64, demands: &[u64]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| (demands[i], i));
    let mut targets = vec![0; demands.len()];
    let mut left = available;
    for (done, &i) in order.iter().enumerate() {
        let even = left / (demands.len() - done) as u64;
        let target = demands[i].max(floor).min(even.max(floor));
        targets[i] = target;
        left = left.saturating_sub(target);
    }
    targets
}

/// The next grants: shrinks at once (still counted at the old cap until applied), growth only
/// out of what is neither held nor counted, in room order.
fn next_grants(available: u64, floor: u64, rooms: &[ShareState]) -> Vec<u64> {
    let demands: Vec<u64> = rooms.iter().map(|r| r.demand).collect();
    let targets = fair_targets(available, floor, &demands);
    let mut grants: Vec<u64> = rooms.iter().map(|r| r.granted).collect();
    for (i, room) in rooms.iter().enumerate() {
        if targets[i] < room.granted {
            grants[i] = targets[i];
        }
    }
    let counted: u64 =
        rooms.iter().zip(&grants).map(|(room, grant)| ShareState { granted: *grant, ..*room }.counted()).sum();
    let mut free = available.saturating_sub(counted);
    for (i, room) in rooms.iter().enumerate() {
        let holds = ShareState { granted: grants[i], ..*room }.counted();
        if targets[i] > holds {
            let more = (targets[i] - holds).min(free);
            grants[i] = holds + more;
            free -= more;
        }
    }
    grants
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn room(demand: u64, granted: u64, applied: u64) -> ShareState {
        ShareState { demand, granted, applied }
    }

    #[test]
    fn rooms_wanting_little_get_it_and_the_rest_split_what_is_left() {
        let targets = fair_targets(100 * MB, MB, &[5 * MB, 200 * MB, 0, 300 * MB]);
        assert_eq!(targets, vec![5 * MB, 47 * MB, MB, 47 * MB]);
        assert!(targets.iter().sum::<u64>() <= 100 * MB);
    }

    #[test]
    fn a_shrinking_room_is_counted_at_its_old_cap_until_it_applies_the_new_one() {
        // Room 0 held 60 MB and is asked to give half; room 1 wants more.
        let rooms = [room(10 * MB, 60 * MB, 60 * MB), room(100 * MB, 30 * MB, 30 * MB)];
        let grants = next_grants(100 * MB, MB, &rooms);
        assert_eq!(grants[0], 10 * MB, "shrinks at once");
        assert_eq!(grants[1], 40 * MB, "grows only by what is free: 100 - 60 (not applied yet) - 30 + its 30");
        // Room 0 applied its 10 MB: now room 1 may grow into it.
        let rooms = [room(10 * MB, 10 * MB, 10 * MB), room(100 * MB, 40 * MB, 40 * MB)];
        assert_eq!(next_grants(100 * MB, MB, &rooms), vec![10 * MB, 90 * MB]);
    }

    #[test]
    fn grants_never_sum_past_what_is_available_through_any_sequence_of_demands() {
        // Rooms whose demands swing, each applying its grant one round late or not at all:
        // whatever they do, the caps that can be in force never sum past the budget.
        let available = 100 * MB;
        let mut rooms: Vec<ShareState> = (0..5).map(|_| room(0, MB, MB)).collect();
        let mut rng = encore_systems::components::rng::SplitMix64::new(7);
        for round in 0..2000 {
            for room in rooms.iter_mut() {
                room.demand = rng.next_u64() % (80 * MB);
                // Some rooms apply, some do not yet.
                if !rng.next_u64().is_multiple_of(3) {
                    room.applied = room.granted;
                }
            }
            let grants = next_grants(available, MB, &rooms);
            for (room, grant) in rooms.iter_mut().zip(grants) {
                room.granted = grant;
                assert!(grant >= MB, "round {round}: below the floor");
            }
            let in_force: u64 = rooms.iter().map(ShareState::counted).sum();
            assert!(in_force <= available, "round {round}: {in_force} > {available}");
        }
    }

    #[test]
    fn a_new_room_always_has_its_floor_and_closed_rooms_give_theirs_back() {
        let budget = Budget::new(400 * MB, 4);
        assert_eq!(budget.floor, 25 * MB);
        let shares: Vec<Arc<RoomShare>> = (0..4).map(|serial| budget.admit(serial)).collect();
        // Every room floods: each takes what it can.
        for _ in 0..5 {
            for share in &shares {
                share.report(share.granted(), share.granted(), share.added.load(Ordering::Relaxed) + 50 * MB);
            }
            budget.rebalance();
            assert!(budget.view().granted_bytes <= 400 * MB);
        }
        assert_eq!(budget.view().granted_bytes, 400 * MB, "a flooded budget is all given out");
        shares[3].close();
        budget.rebalance();
        let view = budget.view();
        assert_eq!(view.rooms.len(), 3);
        assert!(view.granted_bytes <= 400 * MB - 25 * MB, "the closed room's floor is kept for a new one");
    }
}
