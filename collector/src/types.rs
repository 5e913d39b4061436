//! Types every stage shares: how a session and a connection are named, and the clock of the
//! kernel's record times.

use std::net::IpAddr;

/// A session as the MRTE format names it: client address and port.
pub type SessionKey = (IpAddr, u16);

/// A TCP connection: the client's session and the server address and port it talks to. The
/// MRTE format carries only the session; two connections of one client address and port to
/// two server sockets have separate flows, but publish into the same session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub client: SessionKey,
    pub server: (IpAddr, u16),
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel program's record times
/// (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
