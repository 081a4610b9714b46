//! Time, injected. The verifier, the key cache and the ticket store never read the system clock
//! directly, so tests can put a token exactly at `exp`, or jump a cache past its `max-age`, without
//! sleeping and without depending on how fast the machine is.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix milliseconds. JWT times are Unix seconds, and the key cache and the
/// ticket store only need millisecond resolution, so one integer clock serves all three.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;

    /// Whole Unix seconds (floor), the unit of `exp`, `iat` and `auth_time`.
    fn now_s(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// A clock shared by every auth component of one server.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
            // A clock set before 1970 is broken; every token then looks issued in the future,
            // which fails closed.
            Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that moves only when told to: for tests, and for replaying recorded sessions.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock standing at `unix_s` seconds.
    pub fn at_secs(unix_s: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(unix_s.saturating_mul(1000))))
    }

    pub fn set_secs(&self, unix_s: i64) {
        self.0.store(unix_s.saturating_mul(1000), Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// This clock as the shared trait object the auth components take.
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}
