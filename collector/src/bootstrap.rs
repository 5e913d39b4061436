//! Session bootstrap and garbage collection through the MySQL process list.
//!
//! Sessions open before capture began never send their default database again, so the
//! consumer gets a synthetic COM_INIT_DB unit for each; sessions that vanish get a synthetic
//! COM_QUIT. This module reads the process list and maps its rows to the sessions the capture
//! sees; [`crate::pipeline::Pipeline`] puts the units into each session's own publisher queue,
//! in order with the session's captured segments.
//!
//! MariaDB lists a client as `ip:port`, or as `name:port` when its address resolves (loopback
//! clients are `localhost:PORT`). Names are mapped back to addresses through the kernel's TCP
//! socket table: the server's established socket with that client port.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use foldhash::{HashMap, HashSet};

use mysql_async::prelude::Queryable as _;
use tokio::sync::{mpsc, oneshot};

use crate::{sockets::server_connections, status::PipelineCounters, types::SessionKey};

#[derive(Clone, Debug)]
pub struct MysqlConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The server's listening ports (the captured ones): how its sockets are told apart from
    /// other sockets on the host.
    pub server_ports: Vec<u16>,
    pub connect_timeout: Duration,
    /// Delay before the second bootstrap pass, for sessions that were mid-handshake.
    pub second_pass: Duration,
    pub gc_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "cannot connect to MySQL at {addr} as {user:?}: {cause}. Check --mysql_host, \
         --mysql_port, --mysql_user and --mysql_password (or MRTE_MYSQL_PASSWORD), or pass \
         --mysql_optional to run without the session bootstrap"
    )]
    Connect {
        addr: String,
        user: String,
        cause: mysql_async::Error,
    },
    #[error("no answer from MySQL at {addr} within {secs} s (--mysql_host, --mysql_port)")]
    Timeout { addr: String, secs: u64 },
    #[error(
        "MySQL user {user:?} lacks the PROCESS privilege (granted neither to it nor to a role \
         it has enabled), so the process list shows only its own sessions: GRANT PROCESS ON \
         *.* TO the user (or to a role that is its default), or pass --mysql_optional to run \
         without the session bootstrap"
    )]
    NoProcessPrivilege { user: String },
    #[error("reading the process list from MySQL at {addr}: {cause}")]
    Query {
        addr: String,
        cause: mysql_async::Error,
    },
}

/// One client session of the process list, mapped to the address the capture sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub id: u64,
    /// Default database; `None` when the session has none.
    pub db: Option<String>,
    /// Still authenticating: its database is not known yet.
    pub handshaking: bool,
}

/// One read of the process list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The collector's own connection.
    pub own: Option<SessionKey>,
    pub sessions: HashMap<SessionKey, Session>,
    /// Replicas' connections (binlog dump threads): never bootstrapped, never closed.
    pub replication: HashSet<SessionKey>,
    /// The replicas' binlog dump thread ids (also of rows not placed).
    pub replication_ids: HashSet<u64>,
    /// Rows the socket table could not place.
    pub unresolved: Vec<Unresolved>,
    /// Reads of the socket table that failed.
    pub socket_table_errors: u64,
}

/// A process-list row whose host the socket table could not place, typically a session that
/// closed between the two reads: the pipeline looks for it among the sessions it captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub host: String,
    pub port: u16,
    /// What the host name stands for: `None` for `localhost` (any loopback address), else
    /// the name's addresses (filled in by [`Mysql::read`]).
    pub addrs: Option<Vec<IpAddr>>,
    /// The session, if the row is an ordinary client's.
    pub session: Option<Session>,
}

impl Unresolved {
    pub fn matches(&self, key: &SessionKey) -> bool {
        key.1 == self.port
            && match &self.addrs {
                None => key.0.is_loopback(),
                Some(addrs) => addrs.contains(&key.0),
            }
    }
}

/// What a process-list read is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Right after attaching: every session with a database gets COM_INIT_DB.
    First,
    /// A little later: sessions that were mid-handshake at the first pass.
    Second,
    /// SIGUSR1, or the first pass after MySQL became reachable: like `First`.
    Again,
    /// Garbage collection: sessions gone since the last read get COM_QUIT.
    Gc,
}

/// Messages from the bootstrap task to the pipeline.
#[derive(Debug)]
pub enum Event {
    /// Hold captured segments until the next snapshot (or `Release`): a read is under way
    /// and the collector's own new connection is not known yet. The sender, if any, is told
    /// once the hold is on: a new connection must not start before, or its first segments
    /// could be drained (and published) ahead of the hold.
    Hold(Option<oneshot::Sender<()>>),
    Release,
    Snapshot(Pass, Snapshot),
}

/// Replication threads by the state prefix of their process-list row (from the original), and
/// by command.
const REPLICATION_STATES: [&str; 4] = [
    "Waiting for master",
    "Has read all relay log",
    "Waiting on empty queue",
    "Master has sent all binlog",
];
const REPLICATION_COMMANDS: [&str; 2] = ["Binlog Dump", "Binlog Dump GTID"];

pub fn is_replication(command: &str, state: Option<&str>) -> bool {
    REPLICATION_COMMANDS.contains(&command)
        || state.is_some_and(|s| REPLICATION_STATES.iter().any(|p| s.starts_with(p)))
}

/// The server's error for a statement an option prevents (`--skip-grant-tables` for SHOW
/// GRANTS).
const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290;

/// Whether one `SHOW GRANTS` line grants PROCESS globally: `GRANT <privileges> ON *.* TO ..`
/// with PROCESS or ALL [PRIVILEGES] among the privileges (MySQL 8 lists ALL one by one).
/// Role grants (`GRANT role TO user`) and names that merely contain "process" do not count.
pub fn grants_process(line: &str) -> bool {
    let line = line.to_ascii_uppercase();
    let Some(rest) = line.strip_prefix("GRANT ") else {
        return false;
    };
    let Some((privileges, target)) = rest.split_once(" ON ") else {
        return false;
    };
    target.trim_start().starts_with("*.* ")
        && privileges
            .split(',')
            .map(str::trim)
            .any(|p| matches!(p, "PROCESS" | "ALL" | "ALL PRIVILEGES"))
}

/// An identifier in backticks, for a statement.
fn quoted(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Splits a process-list host into name (or address) and port: `ip:port`, `[v6]:port`,
/// `v6:port`, `name:port`. Hosts without a port (Unix socket clients) give `None`.
pub fn split_host(host: &str) -> Option<(&str, u16)> {
    let (name, port) = host.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    (!name.is_empty()).then_some((name, port))
}

/// Maps a process-list host to the client address the capture sees.
pub fn resolve(host: &str, connections: &[SocketAddr]) -> Option<SessionKey> {
    let (name, port) = split_host(host)?;
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some((ip.to_canonical(), port));
    }
    // `localhost` is a loopback client whatever else uses that port (found by the `flood`
    // test: with 20,000 clients on other addresses, the agent's own `localhost:PORT` matched
    // one of theirs).
    let loopback = name == "localhost";
    let mut candidates = connections
        .iter()
        .filter(|c| c.port() == port && (!loopback || c.ip().is_loopback()));
    let first = candidates.next()?;
    let more: Vec<_> = candidates.collect();
    if more.is_empty() {
        return Some((first.ip(), port));
    }
    // Several clients use that port: keep those whose address the name stands for.
    let named: Vec<IpAddr> = if name == "localhost" {
        vec![]
    } else {
        std::net::ToSocketAddrs::to_socket_addrs(&(name, port))
            .map(|a| a.map(|s| s.ip().to_canonical()).collect())
            .unwrap_or_default()
    };
    let mut matching = std::iter::once(first).chain(more).filter(|c| {
        if name == "localhost" {
            c.ip().is_loopback()
        } else {
            named.contains(&c.ip())
        }
    });
    match (matching.next(), matching.next()) {
        (Some(one), None) => Some((one.ip(), port)),
        _ => None,
    }
}

/// Further reads of the socket table for sessions not found in the first.
const SOCKET_TABLE_RETRIES: usize = 4;

/// A process-list row as read.
#[derive(Clone, Debug)]
pub struct Row {
    pub id: u64,
    pub host: String,
    pub db: Option<String>,
    pub command: String,
    pub state: Option<String>,
    pub own: bool,
}

/// Builds a snapshot from rows and the socket table.
pub fn snapshot(rows: &[Row], connections: &[SocketAddr]) -> Snapshot {
    let mut s = Snapshot::default();
    for r in rows {
        // Unix-socket clients and system threads (a replica's own I/O and SQL threads among
        // them) have no port: nothing to capture.
        let Some((name, port)) = split_host(&r.host) else {
            continue;
        };
        let replication = !r.own && is_replication(&r.command, r.state.as_deref());
        if replication {
            s.replication_ids.insert(r.id);
        }
        let session = Session {
            id: r.id,
            db: r.db.clone().filter(|d| !d.is_empty()),
            handshaking: r.command == "Connect",
        };
        let Some(key) = resolve(&r.host, connections) else {
            // Names are looked up later, off this function (it runs in tests too).
            let addrs = (name != "localhost").then(Vec::new);
            s.unresolved.push(Unresolved {
                host: r.host.clone(),
                port,
                addrs,
                session: (!replication && !r.own).then_some(session),
            });
            continue;
        };
        if replication {
            s.replication.insert(key);
        } else if r.own {
            s.own = Some(key);
        } else {
            s.sessions.insert(key, session);
        }
    }
    s
}

/// The connection the bootstrap reads the process list over.
pub struct Mysql {
    conn: mysql_async::Conn,
    cfg: MysqlConfig,
}

impl Mysql {
    fn addr(cfg: &MysqlConfig) -> String {
        if cfg.host.contains(':') {
            format!("[{}]:{}", cfg.host, cfg.port)
        } else {
            format!("{}:{}", cfg.host, cfg.port)
        }
    }

    pub async fn connect(cfg: &MysqlConfig) -> Result<Self, BootstrapError> {
        let addr = Self::addr(cfg);
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(cfg.host.clone())
            .tcp_port(cfg.port)
            .user(Some(cfg.user.clone()))
            .pass(Some(cfg.password.clone()))
            // The socket table maps this connection like any other; no socket switch.
            .prefer_socket(false);
        let conn = tokio::time::timeout(cfg.connect_timeout, mysql_async::Conn::new(opts))
            .await
            .map_err(|_| BootstrapError::Timeout {
                addr: addr.clone(),
                secs: cfg.connect_timeout.as_secs(),
            })?
            .map_err(|cause| BootstrapError::Connect {
                addr,
                user: cfg.user.clone(),
                cause,
            })?;
        Ok(Self {
            conn,
            cfg: cfg.clone(),
        })
    }

    /// Without the PROCESS privilege the process list shows only the user's own sessions, and
    /// the bootstrap would silently find nothing. Judged by what the server grants the
    /// session: the user's global grants, those of its enabled roles (MariaDB lists them in
    /// `SHOW GRANTS`; MySQL 8 only when asked for each role), or no grant tables at all.
    pub async fn check_process_privilege(&mut self) -> Result<(), BootstrapError> {
        let addr = Self::addr(&self.cfg);
        let grants: Vec<String> = match self.conn.query("SHOW GRANTS").await {
            Ok(g) => g,
            Err(mysql_async::Error::Server(e)) if e.code == ER_OPTION_PREVENTS_STATEMENT => {
                // --skip-grant-tables: nothing is checked, every session is listed (but
                // without client hosts, so no session open before capture can be placed).
                tracing::warn!(
                    "MySQL at {addr} runs without grant tables (--skip-grant-tables): its \
                     process list names no client hosts, so sessions open before capture start \
                     without their database"
                );
                return Ok(());
            }
            Err(cause) => return Err(BootstrapError::Query { addr, cause }),
        };
        if grants.iter().any(|g| grants_process(g)) {
            return Ok(());
        }
        // MySQL 8.0.19+ (ROLE_NAME, ROLE_HOST, ...); MariaDB (ROLE_NAME); older servers have
        // no such table, and a role that cannot be looked up grants nothing here.
        let roles: Vec<mysql_async::Row> = self
            .conn
            .query("SELECT * FROM information_schema.ENABLED_ROLES")
            .await
            .unwrap_or_default();
        for role in roles {
            let Some(Some(name)) = role.get_opt::<Option<String>, _>(0).and_then(Result::ok) else {
                continue;
            };
            let host = role
                .get_opt::<Option<String>, _>(1)
                .and_then(Result::ok)
                .flatten();
            let sql = match host {
                Some(host) => format!("SHOW GRANTS FOR {}@{}", quoted(&name), quoted(&host)),
                None => format!("SHOW GRANTS FOR {}", quoted(&name)),
            };
            let grants: Vec<String> = self.conn.query(sql).await.unwrap_or_default();
            if grants.iter().any(|g| grants_process(g)) {
                return Ok(());
            }
        }
        Err(BootstrapError::NoProcessPrivilege {
            user: self.cfg.user.clone(),
        })
    }

    /// Reads the process list (the collector's own row marked).
    pub async fn read(&mut self) -> Result<Snapshot, BootstrapError> {
        type Columns = (u64, String, Option<String>, String, Option<String>, u8);
        let rows: Vec<Columns> = self
            .conn
            .query(
                "SELECT id, host, db, command, state, id = CONNECTION_ID() \
                 FROM information_schema.processlist",
            )
            .await
            .map_err(|cause| BootstrapError::Query {
                addr: Self::addr(&self.cfg),
                cause,
            })?;
        let rows: Vec<Row> = rows
            .into_iter()
            .map(|(id, host, db, command, state, own)| Row {
                id,
                host,
                db,
                command,
                state,
                own: own == 1,
            })
            .collect();
        // Off the runtime's thread, which also drains the ring: the socket table of a busy
        // host, and the name lookups of `resolve`, take their time.
        let ports = self.cfg.server_ports.clone();
        let mut snap = tokio::task::spawn_blocking(move || map_rows(&rows, &ports))
            .await
            .expect("the process-list mapping does not panic");
        for u in &mut snap.unresolved {
            if let Some(addrs) = &mut u.addrs {
                let name = split_host(&u.host).map_or("", |(name, _)| name);
                let found = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::lookup_host((name, u.port)),
                )
                .await;
                if let Ok(Ok(found)) = found {
                    addrs.extend(found.map(|a| a.ip().to_canonical()));
                }
            }
        }
        Ok(snap)
    }
}

/// The process list's rows mapped to the sessions the capture sees, through the socket table.
/// A dump resumes by position: while connections open and close, a socket can be skipped.
/// Sessions not found are looked for again in fresh dumps (kept together: a socket seen once
/// is real).
fn map_rows(rows: &[Row], server_ports: &[u16]) -> Snapshot {
    let mut connections = Vec::new();
    let mut failed = None;
    let mut read = |connections: &mut Vec<SocketAddr>| match server_connections(server_ports) {
        Ok(found) => {
            connections.extend(found);
            connections.sort();
            connections.dedup();
        }
        Err(e) => failed = Some(e),
    };
    read(&mut connections);
    let mut snap = snapshot(rows, &connections);
    for _ in 0..SOCKET_TABLE_RETRIES {
        if snap.unresolved.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        read(&mut connections);
        snap = snapshot(rows, &connections);
    }
    if let Some(e) = failed {
        tracing::warn!(
            "reading the TCP socket table (sock_diag netlink) failed: {e}; sessions listed by \
             host name may stay unresolved"
        );
        snap.socket_table_errors += 1;
    }
    snap
}

/// The bootstrap task: first and second pass, then garbage collection every `gc_interval`
/// and a new pass on every `again` signal (SIGUSR1). MySQL failures are counted and retried
/// with backoff; capture and publishing go on meanwhile.
pub async fn run(
    cfg: MysqlConfig,
    mut mysql: Option<Mysql>,
    events: mpsc::UnboundedSender<Event>,
    mut again: mpsc::UnboundedReceiver<()>,
    counters: Arc<PipelineCounters>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut first_done = false;
    let mut reconnected = false;
    let mut second_at: Option<tokio::time::Instant> = None;
    let mut gc = tokio::time::interval(cfg.gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    gc.tick().await;
    loop {
        // (Re)connect, holding captured segments until the new connection is known as ours.
        let conn = match mysql.as_mut() {
            Some(c) => c,
            None => {
                let (on, held) = oneshot::channel();
                let _ = events.send(Event::Hold(Some(on)));
                let _ = held.await;
                match Mysql::connect(&cfg).await {
                    Ok(c) => {
                        tracing::info!(mysql = %Mysql::addr(&cfg), "connected to MySQL");
                        backoff = Duration::from_secs(1);
                        reconnected = first_done;
                        mysql.insert(c)
                    }
                    Err(e) => {
                        let _ = events.send(Event::Release);
                        PipelineCounters::add(&counters.mysql_errors, 1);
                        tracing::warn!("{e}; retrying in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
        };
        let pass = if !first_done {
            Pass::First
        } else if std::mem::take(&mut reconnected) {
            // Read at once: everything is held until the new connection is known as ours,
            // and sessions that ended meanwhile (a server restart ends them all) get their
            // COM_QUIT now rather than a GC interval later.
            Pass::Gc
        } else {
            let second = second_at;
            tokio::select! {
                _ = tokio::time::sleep_until(second.unwrap_or_else(tokio::time::Instant::now)),
                    if second.is_some() => Pass::Second,
                _ = gc.tick() => Pass::Gc,
                Some(()) = again.recv() => Pass::Again,
            }
        };
        if pass != Pass::Gc {
            let _ = events.send(Event::Hold(None));
        }
        match conn.read().await {
            Ok(snap) => {
                PipelineCounters::add(&counters.socket_table_errors, snap.socket_table_errors);
                if pass == Pass::First {
                    first_done = true;
                    second_at = Some(tokio::time::Instant::now() + cfg.second_pass);
                } else if pass == Pass::Second {
                    second_at = None;
                }
                tracing::info!(
                    ?pass,
                    sessions = snap.sessions.len(),
                    with_db = snap.sessions.values().filter(|s| s.db.is_some()).count(),
                    replication = snap.replication.len(),
                    unresolved = snap.unresolved.len(),
                    own = ?snap.own,
                    "read the MySQL process list"
                );
                let _ = events.send(Event::Snapshot(pass, snap));
            }
            Err(e) => {
                let _ = events.send(Event::Release);
                PipelineCounters::add(&counters.mysql_errors, 1);
                tracing::warn!("{e}; reconnecting");
                mysql = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_is_granted_only_globally_and_by_name() {
        for yes in [
            "GRANT PROCESS ON *.* TO `mrte`@`%`",
            "GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION",
            "GRANT SELECT, RELOAD, PROCESS, REPLICATION CLIENT ON *.* TO `u`@`h`",
            // MySQL 8's ALL, static privileges listed one by one.
            "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, RELOAD, SHUTDOWN, PROCESS, FILE \
             ON *.* TO `root`@`localhost` WITH GRANT OPTION",
            // A role's line, as MariaDB's SHOW GRANTS lists it for the enabled role.
            "grant process on *.* to `monitoring`",
        ] {
            assert!(grants_process(yes), "{yes}");
        }
        for no in [
            "GRANT USAGE ON *.* TO `processor`@`localhost` IDENTIFIED BY PASSWORD '*7B9E'",
            "GRANT `process_role` TO `u`@`localhost`",
            "GRANT ALL PRIVILEGES ON `process`.* TO `u`@`%`",
            "GRANT SELECT ON `db`.`process` TO `u`@`%`",
            // MySQL 8's dynamic privileges, on their own line.
            "GRANT BACKUP_ADMIN,CONNECTION_ADMIN ON *.* TO `u`@`%`",
            "GRANT PROXY ON ''@'%' TO 'u'@'%' WITH GRANT OPTION",
            "SET DEFAULT ROLE `process` FOR `u`@`localhost`",
        ] {
            assert!(!grants_process(no), "{no}");
        }
    }

    #[test]
    fn hosts_split_in_every_spelling() {
        assert_eq!(split_host("10.0.0.7:51000"), Some(("10.0.0.7", 51000)));
        assert_eq!(split_host("localhost:40000"), Some(("localhost", 40000)));
        assert_eq!(split_host("::1:40000"), Some(("::1", 40000)));
        assert_eq!(
            split_host("[2001:db8::5]:40000"),
            Some(("2001:db8::5", 40000))
        );
        assert_eq!(split_host("localhost"), None);
        assert_eq!(split_host(""), None);
    }

    #[test]
    fn names_resolve_through_the_socket_table() {
        let conns: Vec<SocketAddr> = vec![
            "127.0.0.1:40000".parse().unwrap(),
            "198.18.0.2:40001".parse().unwrap(),
            "[::1]:40001".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            resolve("localhost:40000", &conns),
            Some((ip("127.0.0.1"), 40000))
        );
        // Two clients on 40001: "localhost" picks the loopback one.
        assert_eq!(resolve("localhost:40001", &conns), Some((ip("::1"), 40001)));
        assert_eq!(
            resolve("::ffff:198.18.0.9:7", &conns),
            Some((ip("198.18.0.9"), 7))
        );
        assert_eq!(resolve("localhost:40002", &conns), None);
        // The only client on a port, but not a loopback one: not "localhost".
        let other = vec!["198.18.7.2:40003".parse().unwrap()];
        assert_eq!(resolve("localhost:40003", &other), None);
    }

    #[test]
    fn snapshot_skips_replication_own_and_socket_clients() {
        let row = |id, host: &str, db: Option<&str>, command: &str, state: Option<&str>| Row {
            id,
            host: host.into(),
            db: db.map(Into::into),
            command: command.into(),
            state: state.map(Into::into),
            own: false,
        };
        let mut rows = vec![
            row(1, "198.18.0.2:100", Some("shop"), "Sleep", None),
            row(2, "198.18.0.2:101", Some(""), "Query", None),
            row(3, "198.18.0.3:102", None, "Connect", Some("login")),
            row(
                4,
                "198.18.0.4:103",
                None,
                "Binlog Dump",
                Some("Master has sent all binlog to slave; waiting for more updates"),
            ),
            row(
                5,
                "198.18.0.5:104",
                Some("x"),
                "Query",
                Some("Waiting for master to send event"),
            ),
            row(6, "localhost", Some("y"), "Sleep", None),
            row(7, "gone.example:105", None, "Sleep", None),
            row(
                8,
                "198.18.0.1:106",
                None,
                "Query",
                Some("Filling schema table"),
            ),
        ];
        rows[7].own = true;
        let s = snapshot(&rows, &[]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(s.own, Some((ip("198.18.0.1"), 106)));
        assert_eq!(s.unresolved.len(), 1);
        let gone = &s.unresolved[0];
        assert_eq!((gone.host.as_str(), gone.port), ("gone.example:105", 105));
        assert_eq!(gone.session.as_ref().map(|s| s.id), Some(7));
        assert_eq!(
            s.replication,
            [(ip("198.18.0.4"), 103), (ip("198.18.0.5"), 104)]
                .into_iter()
                .collect()
        );
        assert_eq!(s.replication_ids.len(), 2);
        assert_eq!(s.sessions.len(), 3);
        assert_eq!(
            s.sessions[&(ip("198.18.0.2"), 100)].db.as_deref(),
            Some("shop")
        );
        assert_eq!(s.sessions[&(ip("198.18.0.2"), 101)].db, None);
        assert!(s.sessions[&(ip("198.18.0.3"), 102)].handshaking);
    }
}
