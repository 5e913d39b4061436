//! The clsact qdisc and the filters on it, over rtnetlink: aya adds a clsact qdisc and its
//! filters but has no call to list or remove qdiscs.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::iface::interface_index;

/// Sends one request; returns the messages of its answer (a dump's, or none for an
/// acknowledged change), or the error the kernel answered with.
fn request(message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
    packet.header.flags = NLM_F_REQUEST | flags;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut answer = Vec::new();
    let mut rx = vec![0u8; 64 << 10];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        let mut at = 0;
        while at < n {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[at..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(answer),
                // An ACK (no code) ends a change; a code is the kernel's errno.
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        None => Ok(answer),
                    };
                }
                NetlinkPayload::InnerMessage(m) => answer.push(m),
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

fn tc_message(ifindex: u32, parent: TcHandle, handle: TcHandle) -> TcMessage {
    let mut m = TcMessage::with_index(ifindex as i32);
    m.header.parent = parent;
    m.header.handle = handle;
    m
}

/// Whether the interface has a clsact qdisc.
fn clsact_present(ifindex: u32) -> io::Result<bool> {
    let dump = request(
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::with_index(ifindex as i32)),
        NLM_F_DUMP,
    )?;
    Ok(dump.iter().any(|m| match m {
        RouteNetlinkMessage::NewQueueDiscipline(q) => {
            q.header.index == ifindex as i32
                && q.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
        }
        _ => false,
    }))
}

/// Filters (anyone's) on the clsact qdisc's ingress and egress hooks. The kernel also lists
/// each (priority, protocol) group as a message without a handle, which may stay a moment
/// after its last filter went: those are not filters.
fn clsact_filters(ifindex: u32) -> io::Result<usize> {
    let mut n = 0;
    for minor in [TcHandle::MIN_INGRESS, TcHandle::MIN_EGRESS] {
        let parent = TcHandle {
            major: u16::MAX,
            minor,
        };
        let dump = request(
            RouteNetlinkMessage::GetTrafficFilter(tc_message(ifindex, parent, TcHandle::UNSPEC)),
            NLM_F_DUMP,
        )?;
        n += dump
            .iter()
            .filter(|m| {
                matches!(m, RouteNetlinkMessage::NewTrafficFilter(f)
                    if f.header.index == ifindex as i32 && f.header.handle != TcHandle::UNSPEC)
            })
            .count();
    }
    Ok(n)
}

/// A BPF filter on a clsact hook: where it sits (for its removal) and the program it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    ifindex: u32,
    parent: TcHandle,
    handle: TcHandle,
    /// Priority and protocol, as the kernel reports them.
    info: u32,
    pub prog_id: u32,
}

/// The BPF filters whose program is named `name` on the interface's ingress (or egress) hook.
/// No clsact qdisc: none.
pub fn bpf_filters(interface: &str, egress: bool, name: &str) -> io::Result<Vec<BpfFilter>> {
    let ifindex = interface_index(interface)
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
    if !clsact_present(ifindex)? {
        return Ok(Vec::new());
    }
    let parent = TcHandle {
        major: u16::MAX,
        minor: if egress {
            TcHandle::MIN_EGRESS
        } else {
            TcHandle::MIN_INGRESS
        },
    };
    let dump = request(
        RouteNetlinkMessage::GetTrafficFilter(tc_message(ifindex, parent, TcHandle::UNSPEC)),
        NLM_F_DUMP,
    )?;
    Ok(dump
        .into_iter()
        .filter_map(|m| {
            let RouteNetlinkMessage::NewTrafficFilter(f) = m else {
                return None;
            };
            if f.header.index != ifindex as i32 || f.header.handle == TcHandle::UNSPEC {
                return None;
            }
            let (mut prog, mut prog_id) = (None, None);
            for a in &f.attributes {
                let TcAttribute::Options(options) = a else {
                    continue;
                };
                for o in options {
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => prog = Some(n),
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => prog_id = Some(*id),
                        _ => {}
                    }
                }
            }
            let prog_id = prog_id?;
            (prog? == name).then_some(BpfFilter {
                ifindex,
                parent: f.header.parent,
                handle: f.header.handle,
                info: f.header.info,
                prog_id,
            })
        })
        .collect())
}

/// Removes one filter found by [`bpf_filters`].
pub fn delete_filter(f: &BpfFilter) -> io::Result<()> {
    let mut m = tc_message(f.ifindex, f.parent, f.handle);
    m.header.info = f.info;
    m.attributes.push(TcAttribute::Kind("bpf".into()));
    request(RouteNetlinkMessage::DelTrafficFilter(m), NLM_F_ACK).map(drop)
}

/// Ids of the BPF programs some live process holds a descriptor of (from /proc/*/fdinfo): a
/// netlink filter whose program nobody holds was left by a process that died.
pub fn held_programs() -> std::collections::HashSet<u32> {
    let mut held = std::collections::HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return held;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // Programs and links (a TCX link holds its program too); sockets and files are
            // told apart by their link alone.
            let bpf = std::fs::read_link(fd.path()).is_ok_and(|t| {
                t.as_os_str() == "anon_inode:bpf-prog" || t.as_os_str() == "anon_inode:bpf_link"
            });
            if !bpf {
                continue;
            }
            let info = p.path().join("fdinfo").join(fd.file_name());
            if let Ok(info) = std::fs::read_to_string(info) {
                held.extend(
                    info.lines()
                        .filter_map(|l| l.strip_prefix("prog_id:"))
                        .filter_map(|v| v.trim().parse::<u32>().ok()),
                );
            }
        }
    }
    held
}

/// Removes the interface's clsact qdisc (and whatever filters are on it).
fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let mut m = tc_message(
        ifindex,
        TcHandle::CLSACT,
        TcHandle {
            major: u16::MAX,
            minor: 0,
        },
    );
    m.attributes.push(TcAttribute::Kind("clsact".into()));
    request(RouteNetlinkMessage::DelQueueDiscipline(m), NLM_F_ACK).map(drop)
}

/// Whether the interface has a clsact qdisc (`None`: it could not be asked, logged).
pub fn has_clsact(interface: &str) -> Option<bool> {
    let asked = interface_index(interface)
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))
        .and_then(clsact_present);
    asked
        .map_err(|e| tracing::warn!(interface, "could not list the qdiscs: {e}"))
        .ok()
}

/// Removes the interface's clsact qdisc unless a filter (anyone's) is still on it: `Some(true)`
/// removed, `Some(false)` in use and left, `None` not there (or netlink failed: logged).
pub fn remove_clsact_if_unused(interface: &str) -> Option<bool> {
    if !has_clsact(interface)? {
        return None;
    }
    let ifindex = interface_index(interface).ok()?;
    match clsact_filters(ifindex) {
        Ok(0) => {}
        Ok(_) => {
            tracing::info!(
                interface,
                "left the clsact qdisc we added: another filter uses it"
            );
            return Some(false);
        }
        Err(e) => {
            tracing::warn!(interface, "could not list the filters on clsact: {e}");
            return None;
        }
    }
    match delete_clsact(ifindex) {
        Ok(()) => {
            tracing::info!(interface, "removed the clsact qdisc we added");
            Some(true)
        }
        // Gone meanwhile.
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOENT) =>
        {
            None
        }
        Err(e) => {
            tracing::warn!(interface, "could not remove the clsact qdisc: {e}");
            None
        }
    }
}
