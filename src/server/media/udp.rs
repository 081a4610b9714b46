//! Batched UDP on a std `UdpSocket`: `sendmmsg(2)` and `recvmmsg(2)` through the `libc` crate
//! (std has no batch API), and `poll(2)` to wait. Linux only, as is the rest of the media path.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Converts a `SocketAddr` into a `sockaddr_storage` and its length.
fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (storage, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (storage, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Sends `packets` with as few `sendmmsg` calls as the kernel allows (1024 per call at most,
/// UIO_MAXIOV). Returns how many were sent; stops at the first error (EAGAIN on a full send
/// buffer included), which is returned only when nothing at all was sent.
pub fn send_batch<B: AsRef<[u8]>>(socket: &UdpSocket, packets: &[(SocketAddr, B)]) -> io::Result<usize> {
    const MAX: usize = 1024;
    let fd = socket.as_raw_fd();
    let mut sent = 0;
    while sent < packets.len() {
        let chunk = &packets[sent..(sent + MAX).min(packets.len())];
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            chunk.iter().map(|(a, _)| to_sockaddr(a)).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, b)| libc::iovec { iov_base: b.as_ref().as_ptr() as *mut libc::c_void, iov_len: b.as_ref().len() })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|i| {
                // SAFETY: msghdr is plain old data; all-zero is valid.
                let mut hdr: libc::msghdr = unsafe { zeroed() };
                hdr.msg_name = &mut addrs[i].0 as *mut _ as *mut libc::c_void;
                hdr.msg_namelen = addrs[i].1;
                hdr.msg_iov = &mut iovs[i] as *mut libc::iovec;
                hdr.msg_iovlen = 1;
                libc::mmsghdr { msg_hdr: hdr, msg_len: 0 }
            })
            .collect();
        // SAFETY: every pointer in msgs points into addrs/iovs/packets, which outlive the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as libc::c_uint, 0) };
        if n < 0 {
            let error = io::Error::last_os_error();
            return if sent == 0 { Err(error) } else { Ok(sent) };
        }
        sent += n as usize;
        if (n as usize) < chunk.len() {
            break;
        }
    }
    Ok(sent)
}

/// A datagram read by [`recv_batch`]: its source and its length in its buffer.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub from: SocketAddr,
    /// Its buffer.
    pub index: usize,
    pub len: usize,
    /// Larger than its buffer: cut short, to be dropped.
    pub truncated: bool,
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Reads up to `buffers.len()` waiting datagrams with one `recvmmsg(2)` into `buffers` (one
/// each), without blocking (the socket is non-blocking). Returns what was read; an empty batch
/// when nothing waited.
pub fn recv_batch(socket: &UdpSocket, buffers: &mut [Vec<u8>], out: &mut Vec<Received>) -> io::Result<()> {
    out.clear();
    let count = buffers.len().min(1024);
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut addrs: Vec<libc::sockaddr_storage> = (0..count).map(|_| unsafe { zeroed() }).collect();
    let mut iovs: Vec<libc::iovec> = buffers[..count]
        .iter_mut()
        .map(|b| libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: b.len() })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..count)
        .map(|i| {
            // SAFETY: msghdr is plain old data; all-zero is valid.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = &mut addrs[i] as *mut _ as *mut libc::c_void;
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[i] as *mut libc::iovec;
            hdr.msg_iovlen = 1;
            libc::mmsghdr { msg_hdr: hdr, msg_len: 0 }
        })
        .collect();
    // SAFETY: every pointer in msgs points into addrs/iovs/buffers, which outlive the call.
    let n = unsafe {
        libc::recvmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), count as libc::c_uint, 0, std::ptr::null_mut())
    };
    if n < 0 {
        let error = io::Error::last_os_error();
        return match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
            _ => Err(error),
        };
    }
    for i in 0..n as usize {
        if let Some(from) = from_sockaddr(&addrs[i]) {
            // A datagram larger than its buffer is truncated (MSG_TRUNC): too large for media.
            let truncated = msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            out.push(Received { from, index: i, len: msgs[i].msg_len as usize, truncated });
        }
    }
    Ok(())
}

/// Waits until one of `fds` is readable or `timeout` passes (poll(2)).
pub fn wait_any(fds: &[std::os::fd::RawFd], timeout: std::time::Duration) -> io::Result<()> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: valid pollfds, their count.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(())
}

/// Asks for socket buffers of `bytes` each way (the kernel may cap them at its maximum): a
/// tick's burst of a worker's sends, and a burst of handshakes, must not overflow them.
pub fn set_buffers(socket: &UdpSocket, bytes: usize) {
    let size = bytes.min(i32::MAX as usize) as libc::c_int;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: a valid socket, a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                &size as *const _ as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// The machine's IPv4 addresses on interfaces that are up, loopback last (getifaddrs(3)).
pub fn interface_ips() -> Vec<std::net::IpAddr> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return vec![std::net::Ipv4Addr::LOCALHOST.into()];
    }
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let entry = unsafe { &*at };
        let up = entry.ifa_flags & libc::IFF_UP as libc::c_uint != 0;
        if up && !entry.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it says.
            let family = unsafe { (*entry.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !found.contains(&ip.into()) {
                    found.push(ip.into());
                }
            }
        }
        at = entry.ifa_next;
    }
    // SAFETY: the list getifaddrs gave us, freed once.
    unsafe { libc::freeifaddrs(list) };
    found.push(std::net::Ipv4Addr::LOCALHOST.into());
    found
}
