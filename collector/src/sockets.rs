//! The kernel's TCP socket table, through sock_diag netlink: only sockets in the states and on
//! the local port asked for come back (the kernel filters, with a bytecode condition), taken
//! one message at a time, so a host with many other sockets costs next to nothing (reading
//! /proc/net/tcp copies the whole table). For the
//! bootstrap (the server's connections) and the TLS set-up (the server's listener). A kernel
//! without sock_diag for TCP (`tcp_diag` not built, or a module that cannot be loaded) has the
//! table read from /proc/net/tcp{,6} instead, said once in the log.

use std::{io, net::SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// (client address, client port) of every established connection to one of `server_ports`,
/// IPv4 and IPv6 (v4-mapped addresses as IPv4).
pub fn server_connections(server_ports: &[u16]) -> io::Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    let dumped = server_ports.iter().try_for_each(|&port| {
        each(StateFlags::ESTABLISHED, port, |h| {
            let id = &h.socket_id;
            out.push(SocketAddr::new(
                id.destination_address.to_canonical(),
                id.destination_port,
            ));
        })
        .map(drop)
    });
    if let Err(e) = dumped {
        if !unsupported(&e) {
            return Err(e);
        }
        out = procfs_table(procfs::net::TcpState::Established, |e| {
            server_ports.contains(&e.local_address.port()).then(|| {
                SocketAddr::new(
                    e.remote_address.ip().to_canonical(),
                    e.remote_address.port(),
                )
            })
        })?;
    }
    // A dump resumes by position: a socket that moves while it runs can show twice.
    out.sort();
    out.dedup();
    Ok(out)
}

/// The sockets listening on TCP `port` (IPv4 or IPv6): inode and owner's uid of each.
pub fn listeners(port: u16) -> io::Result<Vec<(u64, u32)>> {
    let mut out = Vec::new();
    let dumped = each(StateFlags::LISTEN, port, |h| {
        out.push((u64::from(h.inode), h.uid));
    });
    match dumped {
        Ok(_) => Ok(out),
        Err(e) if unsupported(&e) => procfs_table(procfs::net::TcpState::Listen, |e| {
            (e.local_address.port() == port).then_some((e.inode, e.uid))
        }),
        Err(e) => Err(e),
    }
}

/// sock_diag is not there for TCP: the kernel answers ENOENT (no handler for the family and
/// protocol) or refuses the netlink family.
fn unsupported(e: &io::Error) -> bool {
    let unsupported = matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::EPROTONOSUPPORT | libc::EOPNOTSUPP)
    );
    if unsupported {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::info!(
                "the kernel has no sock_diag for TCP ({e}): the socket table is read from \
                 /proc/net/tcp instead, the whole table at each read"
            )
        });
    }
    unsupported
}

/// The fallback: the entries of /proc/net/tcp and tcp6 in `state` that `keep` maps.
fn procfs_table<T>(
    state: procfs::net::TcpState,
    keep: impl Fn(&procfs::net::TcpNetEntry) -> Option<T>,
) -> io::Result<Vec<T>> {
    let mut out = Vec::new();
    for table in [procfs::net::tcp(), procfs::net::tcp6()] {
        let entries = table.map_err(|e| io::Error::other(e.to_string()))?;
        out.extend(
            entries
                .iter()
                .filter(|e| e.state == state)
                .filter_map(&keep),
        );
    }
    Ok(out)
}

/// Every TCP socket (IPv4, then IPv6) in `states` on local port `port`; how many sockets the
/// kernel sent.
fn each(
    states: StateFlags,
    port: u16,
    mut visit: impl FnMut(&InetResponseHeader),
) -> io::Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut recv = Vec::with_capacity(32 << 10);
    let mut sent = 0;
    for (family, id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        dump(
            &socket,
            family,
            id,
            states.clone(),
            port,
            &mut recv,
            &mut |h| {
                sent += 1;
                // The kernel filtered; checked again, as a kernel that ignored the condition
                // would dump everything.
                if h.socket_id.source_port == port {
                    visit(h);
                }
            },
        )?;
    }
    Ok(sent)
}

fn dump(
    socket: &Socket,
    family: u8,
    socket_id: SocketId,
    states: StateFlags,
    port: u16,
    recv: &mut Vec<u8>,
    visit: &mut impl FnMut(&InetResponseHeader),
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    // The crate has no request attributes: the port condition is appended, and the
    // message's length (its first field) grown to take it.
    buf.extend_from_slice(&port_condition(port));
    let len = u32::try_from(buf.len()).expect("a short request");
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    socket.send(&buf, 0)?;

    let bad = |e: netlink_packet_core::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e);
    loop {
        recv.clear();
        let n = socket.recv(recv, 0)?;
        let mut at = 0;
        while at < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&recv[at..n]).map_err(bad)?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => visit(&r.header),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

/// INET_DIAG_REQ_BYTECODE: local port >= `port` and local port <= `port` (the kernel's
/// inet_diag_bc_run; GE and LE are in every kernel, EQ only since 4.16). Each test is an
/// op (code, yes, no: offsets to jump by) and an op whose `no` holds the port; a jump past
/// the end rejects the socket, one to the end exactly accepts it.
fn port_condition(port: u16) -> [u8; 20] {
    const REQ_BYTECODE: u16 = 1;
    const BC_S_GE: u8 = 2;
    const BC_S_LE: u8 = 3;
    let op = |code: u8, yes: u8, no: u16| {
        let no = no.to_ne_bytes();
        [code, yes, no[0], no[1]]
    };
    let mut attr = [0u8; 20];
    attr[..2].copy_from_slice(&20u16.to_ne_bytes());
    attr[2..4].copy_from_slice(&REQ_BYTECODE.to_ne_bytes());
    attr[4..8].copy_from_slice(&op(BC_S_GE, 8, 20));
    attr[8..12].copy_from_slice(&op(0, 0, port));
    attr[12..16].copy_from_slice(&op(BC_S_LE, 8, 12));
    attr[16..20].copy_from_slice(&op(0, 0, port));
    attr
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// The listening side of connections made here is found, by client port, over IPv4 and
    /// IPv6; other ports' are not.
    #[test]
    fn finds_the_established_connections_to_a_port() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let b = TcpStream::connect(v6.local_addr().unwrap()).unwrap();
        let c = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (_a, _b, _c) = (
            v4.accept().unwrap(),
            v6.accept().unwrap(),
            other.accept().unwrap(),
        );
        let ports = [
            v4.local_addr().unwrap().port(),
            v6.local_addr().unwrap().port(),
        ];
        let got = server_connections(&ports).unwrap();
        assert!(got.contains(&a.local_addr().unwrap()), "{got:?}");
        assert!(got.contains(&b.local_addr().unwrap()), "{got:?}");
        assert!(!got.contains(&c.local_addr().unwrap()), "{got:?}");
        let listening = listeners(ports[1]).unwrap();
        assert_eq!(listening.len(), 1, "{listening:?}");
        assert_eq!(listening[0].1, nix::unistd::geteuid().as_raw());
        assert!(listening[0].0 != 0);
        assert!(
            listeners(a.local_addr().unwrap().port())
                .unwrap()
                .is_empty()
        );

        // The kernel filters by port: of the 200 other established sockets, none comes back.
        let others: Vec<_> = (0..100)
            .map(|_| TcpStream::connect(other.local_addr().unwrap()).unwrap())
            .collect();
        let accepted: Vec<_> = (0..100).map(|_| other.accept().unwrap()).collect();
        let mut seen = 0;
        let sent = each(StateFlags::ESTABLISHED, ports[0], |_| seen += 1).unwrap();
        assert_eq!((sent, seen), (1, 1));
        drop((others, accepted));

        // The procfs fallback finds the same.
        let mut table = procfs_table(procfs::net::TcpState::Established, |e| {
            ports.contains(&e.local_address.port()).then(|| {
                SocketAddr::new(
                    e.remote_address.ip().to_canonical(),
                    e.remote_address.port(),
                )
            })
        })
        .unwrap();
        table.sort();
        table.dedup();
        assert_eq!(table, got);
        let inodes = procfs_table(procfs::net::TcpState::Listen, |e| {
            (e.local_address.port() == ports[1]).then_some((e.inode, e.uid))
        })
        .unwrap();
        assert_eq!(inodes, listening);
    }
}
