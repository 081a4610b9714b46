//! What the HTTPS listener lets in, before TLS and HTTP see a byte: at most
//! `limits.connections_per_ip` connections per source address (a WebSocket holds its slot
//! while it is open), and accept failures (out of file descriptors, say) logged at most once a
//! second with how many there were. The TLS handshake and the request headers have their own
//! time limits, set where the server is built (`server::start`).
//!
//! A slow client costs a descriptor and a little memory for as long as it is let in; without
//! these bounds a few hundred of them (a header byte every few seconds, or a TLS connection
//! that never sends a request) took every descriptor and made `/healthz` fail.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How often, at most, a failing `accept` is logged (the count since the last line is in it).
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(1);

/// Open connections by source address, and what was turned away.
pub struct ConnectionLimits {
    per_ip: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    refused: AtomicU64,
    accept_errors: AtomicU64,
    handshake_errors: AtomicU64,
    /// When an accept failure was last logged, and the failures since.
    accept_log: Mutex<(Option<Instant>, u64)>,
}

/// What [`ConnectionLimits`] counted since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: usize,
    /// Connections closed at once for being over the per-address cap.
    pub refused: u64,
    /// `accept` calls that failed (no descriptor left, say).
    pub accept_errors: u64,
    /// Connections dropped before HTTP: TLS handshakes that failed or took too long.
    pub handshake_errors: u64,
}

impl ConnectionLimits {
    /// `per_ip` 0 means no cap.
    pub fn new(per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            per_ip,
            open: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            handshake_errors: AtomicU64::new(0),
            accept_log: Mutex::new((None, 0)),
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Plain counts: a panic elsewhere leaves them usable.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `ip`, or none when the address is at its cap.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = self.open();
        let count = open.entry(ip).or_insert(0);
        if self.per_ip != 0 && *count >= self.per_ip {
            drop(open);
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            crate::metrics::connection_refused(crate::metrics::ConnectionRefusal::PerIpCap);
            if refused.is_power_of_two() {
                tracing::warn!(%ip, cap = self.per_ip, refused, "connections over the per-address cap refused");
            }
            return None;
        }
        *count += 1;
        Some(Slot { limits: self.clone(), ip })
    }

    fn give_back(&self, ip: IpAddr) {
        let mut open = self.open();
        if let Some(count) = open.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&ip);
            }
        }
    }

    /// Called by the server for every failure before a connection reaches HTTP: `addr` is
    /// `None` when `accept` itself failed (the listener), else the connection's peer.
    pub fn on_accept_error(&self, addr: Option<&std::net::SocketAddr>, error: &io::Error) {
        match addr {
            None => {
                self.accept_errors.fetch_add(1, Ordering::Relaxed);
                crate::metrics::connection_refused(crate::metrics::ConnectionRefusal::AcceptError);
                let mut log = self.accept_log.lock().unwrap_or_else(|p| p.into_inner());
                log.1 += 1;
                let due = log.0.is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_EVERY);
                if due {
                    let failures = std::mem::take(&mut log.1);
                    log.0 = Some(Instant::now());
                    drop(log);
                    // EMFILE/ENFILE: every descriptor is taken; the server backs off and retries.
                    tracing::warn!(%error, failures, "accepting HTTPS connections fails");
                }
            }
            Some(addr) => {
                if error.kind() != io::ErrorKind::ConnectionRefused {
                    self.handshake_errors.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::connection_refused(crate::metrics::ConnectionRefusal::Handshake);
                    tracing::debug!(peer = %addr, %error, "connection dropped before HTTP");
                }
            }
        }
    }

    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.open().values().sum(),
            refused: self.refused.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            handshake_errors: self.handshake_errors.load(Ordering::Relaxed),
        }
    }
}

/// A connection's place under its address's cap, given back when the connection ends.
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.give_back(self.ip);
    }
}

/// The acceptor that runs first on every TCP connection: it takes a slot for the peer's
/// address or turns the connection away (closed before the TLS handshake).
#[derive(Clone)]
pub struct LimitedAcceptor {
    limits: Arc<ConnectionLimits>,
}

impl LimitedAcceptor {
    pub fn new(limits: Arc<ConnectionLimits>) -> Self {
        LimitedAcceptor { limits }
    }
}

impl<S> Accept<TcpStream, S> for LimitedAcceptor {
    type Stream = Counted;
    type Service = S;
    type Future = Ready<io::Result<(Counted, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let ip = match stream.peer_addr() {
            Ok(addr) => addr.ip(),
            Err(error) => return ready(Err(error)),
        };
        match self.limits.take(ip) {
            Some(slot) => ready(Ok((Counted { stream, _slot: slot }, service))),
            // ConnectionRefused: the error handler knows it was counted already.
            None => ready(Err(io::Error::new(io::ErrorKind::ConnectionRefused, "over the per-address connection cap"))),
        }
    }
}

/// A TCP stream holding its address's slot.
pub struct Counted {
    stream: TcpStream,
    _slot: Slot,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_at_its_cap_is_refused_until_one_of_its_connections_ends() {
        let limits = ConnectionLimits::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.take(a).expect("under the cap");
        let _second = limits.take(a).expect("at the cap");
        assert!(limits.take(a).is_none(), "over the cap");
        let _other = limits.take(b).expect("another address has its own cap");
        drop(first);
        assert!(limits.take(a).is_some(), "a slot was given back");
        let stats = limits.stats();
        assert_eq!((stats.open, stats.refused), (2, 1), "the last slot taken was dropped at once");
    }

    #[test]
    fn no_cap_when_zero() {
        let limits = ConnectionLimits::new(0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let slots: Vec<Slot> = (0..1000).filter_map(|_| limits.take(ip)).collect();
        assert_eq!(slots.len(), 1000);
    }

    #[test]
    fn accept_failures_are_counted_every_time_and_logged_at_most_once_a_second() {
        let limits = ConnectionLimits::new(1);
        let error = io::Error::from_raw_os_error(24); // EMFILE
        for _ in 0..100 {
            limits.on_accept_error(None, &error);
        }
        assert_eq!(limits.stats().accept_errors, 100);
        let log = limits.accept_log.lock().unwrap();
        assert!(log.0.is_some());
        assert_eq!(log.1, 99, "one line for the first, the other 99 wait for the next");
    }
}
