//! A consumer that replays what the collector published into another server, as MRTE-Player
//! does: one connection per captured session, opened with the database its handshake named;
//! COM_INIT_DB and COM_QUERY executed on it, COM_QUIT closes it.

use std::{collections::HashMap, net::IpAddr};

use collector::{
    encode::decode_message,
    protocol::{HandshakeResponse, Packets, command},
};
use mysql_async::{Conn, OptsBuilder, prelude::*};

use super::broker::Received;

#[derive(Debug, Default)]
pub struct Replayed {
    pub sessions: usize,
    pub queries: usize,
    pub init_dbs: usize,
    pub quits: usize,
    /// Commands the replay does not execute (pings, statistics, ...), by command byte.
    pub other: HashMap<u8, usize>,
    /// Statements that failed on the target, with the session and the error.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Session {
    packets: Packets,
    /// The first packet of a command of 16 MiB or more, joined with those that followed.
    long: Vec<collector::protocol::Packet>,
    started: bool,
    db: Option<String>,
    conn: Option<Conn>,
}

/// Replays `messages`, in the order received, into the server `target` describes.
pub async fn replay(messages: &[Received], target: mysql_async::Opts) -> Replayed {
    let mut sessions: HashMap<(IpAddr, u16), Session> = HashMap::new();
    let mut out = Replayed::default();
    for message in messages {
        for unit in decode_message(&message.data).unwrap().units {
            let key = (IpAddr::V4(unit.ip), unit.port);
            let s = sessions.entry(key).or_default();
            s.packets.push(&unit.data);
            while let Some(mut p) = s.packets.next_packet() {
                // A command of 16 MiB or more goes on in the next packets: wait for them all.
                if p.seq == 0 && p.payload.len() == 0xff_ffff {
                    s.long.push(p);
                    continue;
                }
                if let Some(first) = s.long.first_mut() {
                    first.payload.extend_from_slice(&p.payload);
                    if p.payload.len() == 0xff_ffff {
                        continue;
                    }
                    p = s.long.remove(0);
                }
                if !s.started {
                    s.started = true;
                    out.sessions += 1;
                    if p.seq == 1 {
                        let h = HandshakeResponse::parse(&p.payload)
                            .unwrap_or_else(|| panic!("{key:?}: not a handshake response"));
                        s.db = h.database.map(|d| String::from_utf8(d).unwrap());
                        continue;
                    }
                }
                if p.seq != 0 || p.payload.is_empty() {
                    // Authentication continues (plugin switch, more data): not replayed.
                    continue;
                }
                let arg = String::from_utf8_lossy(&p.payload[1..]).into_owned();
                let result = match p.payload[0] {
                    command::QUIT => {
                        out.quits += 1;
                        if let Some(conn) = s.conn.take() {
                            conn.disconnect().await.unwrap();
                        }
                        // A later session on the same address starts with a handshake.
                        *s = Session::default();
                        continue;
                    }
                    command::INIT_DB => {
                        out.init_dbs += 1;
                        s.db = Some(arg.clone());
                        match &mut s.conn {
                            Some(conn) => conn.query_drop(format!("USE `{arg}`")).await,
                            None => Ok(()),
                        }
                    }
                    command::QUERY => {
                        out.queries += 1;
                        if s.conn.is_none() {
                            let opts = OptsBuilder::from_opts(target.clone()).db_name(s.db.clone());
                            s.conn = Some(Conn::new(opts).await.unwrap());
                        }
                        // The statement's bytes as they are: a rendered binary value is not
                        // UTF-8.
                        let sql = p.payload[1..].to_vec();
                        s.conn.as_mut().unwrap().query_drop(sql).await
                    }
                    other => {
                        *out.other.entry(other).or_default() += 1;
                        Ok(())
                    }
                };
                if let Err(e) = result {
                    let arg: String = arg.chars().take(300).collect();
                    out.errors.push(format!("{key:?}: {arg}: {e}"));
                }
            }
        }
    }
    for (_, s) in sessions {
        if let Some(conn) = s.conn {
            let _ = conn.disconnect().await;
        }
    }
    out
}

/// Every table of `databases` on the server `opts` names, with its rows in primary-key order,
/// spelled as text: two servers whose dumps are equal hold the same data.
pub async fn dump(opts: mysql_async::Opts, databases: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut conn = Conn::new(opts).await.unwrap();
    let mut out = Vec::new();
    for db in databases {
        let tables: Vec<String> = conn
            .exec(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ? \
                 ORDER BY table_name",
                (db,),
            )
            .await
            .unwrap();
        for table in tables {
            let rows: Vec<mysql_async::Row> = conn
                .query(format!("SELECT * FROM `{db}`.`{table}` ORDER BY 1"))
                .await
                .unwrap();
            let rows = rows
                .into_iter()
                .map(|r| format!("{:?}", r.unwrap()))
                .collect();
            out.push((format!("{db}.{table}"), rows));
        }
    }
    conn.disconnect().await.unwrap();
    out
}
