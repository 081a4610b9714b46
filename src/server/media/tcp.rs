//! ICE over TCP (RFC 6544 passive candidates, RFC 4571 framing) on the server's one TCP port,
//! for clients whose UDP is blocked.
//!
//! One thread accepts and reads each new stream's first frame, which must be a STUN binding
//! request: the local ufrag in its USERNAME names the worker (its first two characters), and the
//! stream is handed to that worker, which checks the request's integrity like any other check
//! and binds the stream to the connection it names. A stream that sends anything else, too much,
//! or nothing in time is closed and counted; a bounded number wait at once.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::{TcpArrival, stun, udp, worker_of_ufrag};

/// Streams waiting for their first frame at once; more are closed at accept.
const MAX_PENDING: usize = 1024;
/// How long a new stream may take to send its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest first frame (a binding request is ~100 bytes).
const MAX_FIRST_FRAME: usize = 1500;

/// What the acceptor refused, by cause.
#[derive(Debug, Default)]
pub struct TcpAcceptStats {
    pub accepted: AtomicU64,
    pub handed_over: AtomicU64,
    pub refused_full: AtomicU64,
    pub refused_not_stun: AtomicU64,
    pub refused_timeout: AtomicU64,
}

struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    since: Instant,
    bytes: Vec<u8>,
}

/// Runs the acceptor until `stopping`: hands each stream whose first frame names a worker to
/// that worker's channel.
pub fn run(
    listener: TcpListener,
    workers: Vec<Sender<TcpArrival>>,
    stopping: Arc<AtomicBool>,
    stats: Arc<TcpAcceptStats>,
) {
    if listener.set_nonblocking(true).is_err() {
        tracing::error!("the ICE-TCP listener cannot be made non-blocking; ICE over TCP is off");
        return;
    }
    let mut pending: HashMap<i32, Pending> = HashMap::new();
    let mut buffer = vec![0u8; MAX_FIRST_FRAME + 2];
    while !stopping.load(Ordering::Relaxed) {
        let mut fds = vec![listener.as_raw_fd()];
        fds.extend(pending.keys().copied());
        let _ = udp::wait_any(&fds, Duration::from_millis(200));
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    if pending.len() >= MAX_PENDING || stream.set_nonblocking(true).is_err() {
                        stats.refused_full.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    pending.insert(fd, Pending { stream, peer, since: Instant::now(), bytes: Vec::new() });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // Out of descriptors, say: try again at the next turn.
                    tracing::warn!(%error, "ICE-TCP accept failed");
                    break;
                }
            }
        }
        let now = Instant::now();
        let mut done = Vec::new();
        for (fd, waiting) in pending.iter_mut() {
            match waiting.stream.read(&mut buffer) {
                Ok(0) => done.push((*fd, None)),
                Ok(n) => {
                    waiting.bytes.extend_from_slice(&buffer[..n]);
                    done.extend(first_frame(&waiting.bytes).map(|frame| (*fd, frame)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if now.duration_since(waiting.since) > FIRST_FRAME_TIMEOUT {
                        stats.refused_timeout.fetch_add(1, Ordering::Relaxed);
                        done.push((*fd, None));
                    }
                }
                Err(_) => done.push((*fd, None)),
            }
        }
        for (fd, frame) in done {
            let Some(waiting) = pending.remove(&fd) else { continue };
            let Some(frame) = frame else { continue };
            let worker = stun::is_stun(&frame)
                .then(|| stun::local_ufrag(&frame))
                .flatten()
                .and_then(worker_of_ufrag)
                .and_then(|index| workers.get(index));
            match worker {
                Some(worker) => {
                    let arrival = TcpArrival { stream: waiting.stream, peer: waiting.peer, first_frame: frame };
                    if worker.send(arrival).is_ok() {
                        stats.handed_over.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    stats.refused_not_stun.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The first RFC 4571 frame of `bytes`: `Some(Some(frame))` when whole, `Some(None)` when the
/// stream is not one (too long), `None` while more is needed.
fn first_frame(bytes: &[u8]) -> Option<Option<Vec<u8>>> {
    if bytes.len() < 2 {
        return None;
    }
    let len = u16::from_be_bytes([bytes[0], bytes[1]]) as usize;
    if len > MAX_FIRST_FRAME {
        return Some(None);
    }
    (bytes.len() >= 2 + len).then(|| Some(bytes[2..2 + len].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_frame_is_cut_at_its_length_and_a_huge_one_refused() {
        assert_eq!(first_frame(&[0]), None);
        assert_eq!(first_frame(&[0, 3, 1, 2]), None);
        assert_eq!(first_frame(&[0, 3, 1, 2, 3, 9, 9]), Some(Some(vec![1, 2, 3])));
        assert_eq!(first_frame(&[0xff, 0xff]), Some(None));
    }
}
