//! The interface and the process: privileges, the interface's index, address and framing.

use std::net::Ipv4Addr;

use collector_common::LinkKind;

use super::CaptureError;

/// Reads the effective capability set: loading needs CAP_BPF and CAP_PERFMON (the verifier
/// refuses the programs' pointer arithmetic on packet and map values without it), or
/// CAP_SYS_ADMIN for both; attaching needs CAP_NET_ADMIN. Checking first gives a clearer
/// message than the kernel's EPERM.
pub(super) fn check_privileges() -> Result<(), CaptureError> {
    let Some(has) = capabilities() else {
        // No /proc: let the kernel decide.
        return Ok(());
    };
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::NotPrivileged {
            missing: missing.join(", "),
        })
    }
}

pub(super) const CAP_DAC_READ_SEARCH: u32 = 2;
pub(super) const CAP_NET_ADMIN: u32 = 12;
pub(super) const CAP_SYS_PTRACE: u32 = 19;
pub(super) const CAP_SYS_ADMIN: u32 = 21;
pub(super) const CAP_PERFMON: u32 = 38;
pub(super) const CAP_BPF: u32 = 39;

/// Whether this process has a capability in its effective set (from /proc/self/status;
/// None without /proc).
pub(super) fn capabilities() -> Option<impl Fn(u32) -> bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())?;
    Some(move |cap: u32| eff & (1u64 << cap) != 0)
}

/// The interface's index, or an error listing the interfaces that do exist.
pub fn interface_index(name: &str) -> Result<u32, CaptureError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| CaptureError::UnknownInterface {
        name: name.into(),
        available: nix::net::if_::if_nameindex()
            .map(|list| {
                list.iter()
                    .map(|i| i.name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
    })
}

/// The interface's first IPv4 address: LOCAL_IP in every MRTE message.
pub fn interface_ipv4(name: &str) -> Result<Ipv4Addr, CaptureError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| CaptureError::Addresses(e.into()))?;
    addrs
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .ok_or_else(|| CaptureError::NoIpv4 { name: name.into() })
}

/// The framing the program must parse, from the interface's ARPHRD type.
pub(super) fn link_kind(name: &str) -> Result<LinkKind, CaptureError> {
    const ARPHRD_ETHER: u32 = 1;
    const ARPHRD_PPP: u32 = 512;
    const ARPHRD_RAWIP: u32 = 519;
    const ARPHRD_LOOPBACK: u32 = 772;
    const ARPHRD_NONE: u32 = 65534;
    let arphrd = std::fs::read_to_string(format!("/sys/class/net/{name}/type"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(ARPHRD_ETHER);
    match arphrd {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(LinkKind::Ethernet),
        ARPHRD_NONE | ARPHRD_RAWIP | ARPHRD_PPP => Ok(LinkKind::RawIp),
        arphrd => Err(CaptureError::UnsupportedLink {
            name: name.into(),
            arphrd,
        }),
    }
}

pub(super) fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u32 }
}
