//! Server-side prepared statements as text: a COM_STMT_EXECUTE's binary parameters decoded
//! (every MySQL type, NULLs, types bound by an earlier execute, COM_STMT_SEND_LONG_DATA
//! pieces) and put into the statement's SQL as literals, so that a consumer that only knows
//! COM_QUERY can replay the statement (issue 9; the statement's SQL and parameter count come
//! from the prepare and the server's reply to it).
//!
//! [`Statements`] follows one connection: statement ids from the server's replies to
//! COM_STMT_PREPARE (which the egress program hands over), then each command that uses them.
//!
//! Nothing is guessed: a parameter that cannot be read or written as a literal is an error, and
//! a statement whose reply cannot be told apart from another's gets no id.

use std::collections::VecDeque;

use foldhash::HashMap;
use mysql_common::{
    constants::{ColumnFlags, ColumnType},
    io::ParseBuf,
    misc::raw::{RawBytes, RawInt, int::LenEnc},
    packets::StmtPacket,
    value::{BinValue, Value, ValueDeserializer},
};

use crate::protocol::command;

/// COM_STMT_EXECUTE flag: a parameter count follows the iteration count (query attributes).
const PARAMETER_COUNT_AVAILABLE: u8 = 0x08;

/// The flag byte after a parameter's type: the value is unsigned.
const UNSIGNED: u8 = 0x80;

/// The parameter types whose binary encoding is known here (mysql_common decodes them; any
/// other is refused before it is asked to).
const BINARY_TYPES: [ColumnType; 27] = {
    use ColumnType::*;
    [
        MYSQL_TYPE_DECIMAL,
        MYSQL_TYPE_TINY,
        MYSQL_TYPE_SHORT,
        MYSQL_TYPE_LONG,
        MYSQL_TYPE_FLOAT,
        MYSQL_TYPE_DOUBLE,
        MYSQL_TYPE_NULL,
        MYSQL_TYPE_TIMESTAMP,
        MYSQL_TYPE_LONGLONG,
        MYSQL_TYPE_INT24,
        MYSQL_TYPE_DATE,
        MYSQL_TYPE_TIME,
        MYSQL_TYPE_DATETIME,
        MYSQL_TYPE_YEAR,
        MYSQL_TYPE_VARCHAR,
        MYSQL_TYPE_BIT,
        MYSQL_TYPE_JSON,
        MYSQL_TYPE_NEWDECIMAL,
        MYSQL_TYPE_ENUM,
        MYSQL_TYPE_SET,
        MYSQL_TYPE_TINY_BLOB,
        MYSQL_TYPE_MEDIUM_BLOB,
        MYSQL_TYPE_LONG_BLOB,
        MYSQL_TYPE_BLOB,
        MYSQL_TYPE_VAR_STRING,
        MYSQL_TYPE_STRING,
        MYSQL_TYPE_GEOMETRY,
    ]
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("the execute packet ends inside {what}")]
    Truncated { what: &'static str },
    #[error("no parameter types: the first execute of a statement must bind them")]
    NoTypes,
    #[error("parameter {index} has type 0x{ty:02x}, which has no binary encoding known here")]
    UnknownType { index: usize, ty: u8 },
    #[error("parameter {index} is {what}, which has no SQL literal")]
    NoLiteral { index: usize, what: &'static str },
    #[error("the statement has {placeholders} placeholders but {params} parameters")]
    Placeholders { placeholders: usize, params: usize },
    #[error(
        "parameter {index}'s long data passed {MAX_COMMAND} bytes, or the memory budget \
         (--max_mem_mb), and was not kept"
    )]
    LongDataTooLarge { index: usize },
}

/// One parameter's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    Null,
    Int(i64),
    UInt(u64),
    Float(f32),
    Double(f64),
    /// DECIMAL/NEWDECIMAL: the digits as sent.
    Decimal(String),
    /// Character data (VARCHAR, ENUM, SET, JSON, ...).
    Text(Vec<u8>),
    /// Binary data (BLOBs, BIT, GEOMETRY) and long data.
    Bytes(Vec<u8>),
    Date {
        year: u16,
        month: u8,
        day: u8,
    },
    DateTime {
        year: u16,
        month: u8,
        day: u8,
        hour: u8,
        minute: u8,
        second: u8,
        micro: u32,
    },
    Time {
        negative: bool,
        hours: u64,
        minute: u8,
        second: u8,
        micro: u32,
    },
}

impl Param {
    /// A value sent as bytes (long data, or a length-encoded value) of type `ty`.
    fn of_bytes(ty: u8, data: Vec<u8>) -> Self {
        use ColumnType::*;
        match ColumnType::try_from(ty) {
            Ok(MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL) => {
                Param::Decimal(String::from_utf8_lossy(&data).into_owned())
            }
            Ok(
                MYSQL_TYPE_VARCHAR
                | MYSQL_TYPE_VAR_STRING
                | MYSQL_TYPE_STRING
                | MYSQL_TYPE_ENUM
                | MYSQL_TYPE_SET
                | MYSQL_TYPE_JSON,
            ) => Param::Text(data),
            _ => Param::Bytes(data),
        }
    }

    /// Parameter `index`'s value of type `ty` (with `flags`), decoded by mysql_common.
    pub(crate) fn decode(
        buf: &mut ParseBuf<'_>,
        index: usize,
        ty: u8,
        flags: u8,
    ) -> Result<Self, RenderError> {
        let col = ColumnType::try_from(ty)
            .ok()
            .filter(|t| BINARY_TYPES.contains(t))
            .ok_or(RenderError::UnknownType { index, ty })?;
        let flags = if flags & UNSIGNED != 0 {
            ColumnFlags::UNSIGNED_FLAG
        } else {
            ColumnFlags::empty()
        };
        let value = buf
            .parse::<ValueDeserializer<BinValue>>((col, flags))
            .map_err(|_| RenderError::Truncated {
                what: "a parameter value",
            })?;
        Ok(match value.0 {
            Value::NULL => Param::Null,
            Value::Bytes(b) => Param::of_bytes(ty, b),
            Value::Int(v) => Param::Int(v),
            Value::UInt(v) => Param::UInt(v),
            Value::Float(v) => Param::Float(v),
            Value::Double(v) => Param::Double(v),
            Value::Date(year, month, day, ..) if col == ColumnType::MYSQL_TYPE_DATE => {
                Param::Date { year, month, day }
            }
            Value::Date(year, month, day, hour, minute, second, micro) => Param::DateTime {
                year,
                month,
                day,
                hour,
                minute,
                second,
                micro,
            },
            Value::Time(negative, days, hours, minute, second, micro) => Param::Time {
                negative,
                hours: u64::from(days) * 24 + u64::from(hours),
                minute,
                second,
                micro,
            },
        })
    }
}

/// What a session's statement needs between packets.
#[derive(Clone, Debug, Default)]
pub struct Statement {
    pub sql: Vec<u8>,
    /// Where its placeholders are, found once at the PREPARE.
    spots: Vec<usize>,
    pub params: usize,
    /// (type, flags) per parameter, from the last execute that bound them.
    pub types: Option<Vec<(u8, u8)>>,
    /// COM_STMT_SEND_LONG_DATA pieces per parameter since the last execute or reset.
    pub long_data: Vec<Option<Vec<u8>>>,
    /// A parameter whose long data passed [`MAX_COMMAND`] since then: the next execute
    /// cannot be rendered.
    long_data_over: Option<usize>,
    /// A failure to render was logged (once per statement).
    warned: bool,
}

impl Statement {
    /// A statement whose parameter count is its placeholder count (what a PREPARE's reply
    /// must confirm).
    pub fn from_sql(sql: Vec<u8>) -> Self {
        let spots = placeholders(&sql);
        Self::with_spots(sql, spots.len(), spots)
    }

    /// A statement with the parameter count the server gave.
    pub fn new(sql: Vec<u8>, params: usize) -> Self {
        let spots = placeholders(&sql);
        Self::with_spots(sql, params, spots)
    }

    fn with_spots(sql: Vec<u8>, params: usize, spots: Vec<usize>) -> Self {
        Self {
            sql,
            spots,
            params,
            types: None,
            long_data: vec![None; params],
            long_data_over: None,
            warned: false,
        }
    }

    /// A COM_STMT_SEND_LONG_DATA piece (`param` and data after the statement id).
    pub fn long_data(&mut self, param: usize, data: &[u8]) {
        if let Some(slot) = self.long_data.get_mut(param) {
            let slot = slot.get_or_insert_with(Vec::new);
            if slot.len() + data.len() > MAX_COMMAND {
                self.give_up_long_data(param);
            } else {
                slot.extend_from_slice(data);
            }
        }
    }

    /// Parameter `param`'s long data is given up (no memory for it): the next execute is
    /// not rendered.
    pub fn give_up_long_data(&mut self, param: usize) {
        if let Some(slot) = self.long_data.get_mut(param) {
            *slot = None;
            self.long_data_over = Some(param);
        }
    }

    /// Bytes of long data held.
    fn long_bytes(&self) -> usize {
        self.long_data.iter().flatten().map(Vec::len).sum()
    }

    /// COM_STMT_RESET: the long data is gone.
    pub fn reset(&mut self) {
        self.long_data = vec![None; self.params];
        self.long_data_over = None;
    }

    /// The statement as text for the body of a COM_STMT_EXECUTE (after the command byte).
    /// `attributes`: the session negotiated CLIENT_QUERY_ATTRIBUTES (each bound type is
    /// followed by a name). The long data is used up either way.
    pub fn execute(&mut self, body: &[u8], attributes: bool) -> Result<Vec<u8>, RenderError> {
        let params = match self.long_data_over.take() {
            Some(index) => Err(RenderError::LongDataTooLarge { index }),
            None => self.decode(body, attributes),
        };
        self.long_data.iter_mut().for_each(|slot| *slot = None);
        render_at(&self.sql, &self.spots, &params?)
    }

    /// The parameters of an execute, those sent as long data included. With query
    /// attributes, the execute may say how many values it carries (PARAMETER_COUNT_AVAILABLE):
    /// the statement's parameters, then the attributes, which are not part of the statement.
    fn decode(&mut self, body: &[u8], attributes: bool) -> Result<Vec<Param>, RenderError> {
        let n = self.params;
        let mut buf = ParseBuf(body);
        let truncated = |what| RenderError::Truncated { what };
        // Statement id (4), flags (1), iteration count (4).
        let flags = *body.get(4).ok_or(truncated("the header"))?;
        if !buf.checked_skip(9) {
            return Err(truncated("the header"));
        }
        let count = if flags & PARAMETER_COUNT_AVAILABLE != 0 {
            let count = buf
                .parse::<RawInt<LenEnc>>(())
                .map_err(|_| truncated("the parameter count"))?
                .0 as usize;
            if count < n || count > body.len() {
                return Err(truncated("the parameter count"));
            }
            count
        } else {
            n
        };
        let names = attributes || flags & PARAMETER_COUNT_AVAILABLE != 0;
        if count == 0 {
            return Ok(Vec::new());
        }
        let nulls = buf
            .checked_eat(count.div_ceil(8))
            .ok_or(truncated("the NULL bitmap"))?;
        if buf
            .checked_eat_u8()
            .ok_or(truncated("the new-params-bound flag"))?
            == 1
        {
            let mut types = Vec::with_capacity(count);
            for _ in 0..count {
                let t = buf.checked_eat(2).ok_or(truncated("the parameter types"))?;
                types.push((t[0], t[1]));
                if names {
                    buf.parse::<RawBytes<'_, LenEnc>>(())
                        .map_err(|_| truncated("the parameter names"))?;
                }
            }
            // Only the statement's own parameters are rendered.
            types.truncate(n);
            self.types = Some(types);
        }
        let types = self.types.as_ref().ok_or(RenderError::NoTypes)?;
        let mut out = Vec::with_capacity(n);
        for (i, &(ty, flags)) in types.iter().enumerate() {
            let null = nulls[i / 8] & (1 << (i % 8)) != 0;
            if null || ty == ColumnType::MYSQL_TYPE_NULL as u8 {
                out.push(Param::Null);
                continue;
            }
            if let Some(data) = self.long_data.get_mut(i).and_then(Option::take) {
                // Its value came before, in pieces; nothing of it is here.
                out.push(Param::of_bytes(ty, data));
                continue;
            }
            out.push(Param::decode(&mut buf, i, ty, flags)?);
        }
        Ok(out)
    }
}

/// The SQL with each `?` placeholder (outside strings, quoted names and comments) replaced by
/// its parameter as a literal.
pub fn render(sql: &[u8], params: &[Param]) -> Result<Vec<u8>, RenderError> {
    render_at(sql, &placeholders(sql), params)
}

/// [`render`] with the placeholders' places known.
fn render_at(sql: &[u8], spots: &[usize], params: &[Param]) -> Result<Vec<u8>, RenderError> {
    if spots.len() != params.len() {
        return Err(RenderError::Placeholders {
            placeholders: spots.len(),
            params: params.len(),
        });
    }
    // Room for the packet header and command byte the flow puts in front, in place.
    let mut out = Vec::with_capacity(sql.len() + 16 * params.len() + 5);
    let mut from = 0;
    for (i, (&at, p)) in spots.iter().zip(params).enumerate() {
        out.extend_from_slice(&sql[from..at]);
        literal(i, p, &mut out)?;
        from = at + 1;
    }
    out.extend_from_slice(&sql[from..]);
    Ok(out)
}

/// Where the placeholders are: `?` outside '...', "...", `...`, -- and # comments, /* */.
fn placeholders(sql: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sql.len() {
        match sql[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < sql.len() {
                    if sql[i] == b'\\' && q != b'`' {
                        i += 2;
                        continue;
                    }
                    if sql[i] == q {
                        // A doubled quote stays inside.
                        if sql.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'#' => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'-' if sql.get(i + 1) == Some(&b'-')
                && sql.get(i + 2).is_none_or(|c| c.is_ascii_whitespace()) =>
            {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < sql.len() && !(sql[i] == b'*' && sql[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'?' => out.push(i),
            _ => {}
        }
        i += 1;
    }
    out
}

pub(crate) fn literal(index: usize, p: &Param, out: &mut Vec<u8>) -> Result<(), RenderError> {
    use std::io::Write as _;
    // Written straight into `out` (a Vec's io::Write cannot fail): no String per literal.
    let s = &mut *out;
    match p {
        Param::Null => s.extend_from_slice(b"NULL"),
        Param::Int(v) => s.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes()),
        Param::UInt(v) => s.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes()),
        // Rust prints the shortest text that reads back as the same value.
        Param::Float(v) if v.is_finite() => {
            let _ = write!(s, "{v:e}");
        }
        Param::Double(v) if v.is_finite() => {
            let _ = write!(s, "{v:e}");
        }
        Param::Float(_) | Param::Double(_) => {
            return Err(RenderError::NoLiteral {
                index,
                what: "NaN or infinite",
            });
        }
        Param::Decimal(d) => {
            let ok = !d.is_empty()
                && d.bytes()
                    .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E'));
            if !ok {
                return Err(RenderError::NoLiteral {
                    index,
                    what: "a DECIMAL that is not a number",
                });
            }
            s.extend_from_slice(d.as_bytes());
        }
        Param::Text(t) => quoted(t, s),
        Param::Bytes(b) if b.is_empty() => s.extend_from_slice(b"''"),
        Param::Bytes(b) => {
            s.extend_from_slice(b"X'");
            for x in b {
                let _ = write!(s, "{x:02X}");
            }
            s.push(b'\'');
        }
        Param::Date { year, month, day } => {
            let _ = write!(s, "'{year:04}-{month:02}-{day:02}'");
        }
        Param::DateTime {
            year,
            month,
            day,
            hour,
            minute,
            second,
            micro,
        } => {
            let _ = write!(
                s,
                "'{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}"
            );
            if *micro != 0 {
                let _ = write!(s, ".{micro:06}");
            }
            s.push(b'\'');
        }
        Param::Time {
            negative,
            hours,
            minute,
            second,
            micro,
        } => {
            let sign = if *negative { "-" } else { "" };
            let _ = write!(s, "'{sign}{hours:02}:{minute:02}:{second:02}");
            if *micro != 0 {
                let _ = write!(s, ".{micro:06}");
            }
            s.push(b'\'');
        }
    }
    Ok(())
}

/// A string literal as a client library's escaping writes it (backslash escapes, which every
/// SQL mode but NO_BACKSLASH_ESCAPES reads).
fn quoted(t: &[u8], out: &mut Vec<u8>) {
    out.push(b'\'');
    for &c in t {
        match c {
            0 => out.extend_from_slice(b"\\0"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x1a => out.extend_from_slice(b"\\Z"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\'' => out.extend_from_slice(b"\\'"),
            c => out.push(c),
        }
    }
    out.push(b'\'');
}

/// Most statements one connection keeps (the server's own default `max_prepared_stmt_count`
/// is 16382 for all connections together).
pub const MAX_STATEMENTS: usize = 16382;
/// Most PREPAREs one connection keeps waiting for their replies: a client waits for each
/// (pipelining a few at most), so more means the replies are not seen (asymmetric routing, a
/// mark the kernel evicted); the oldest go, counted as replies lost.
pub const MAX_AWAITING: usize = 32;
/// Most bytes of one command, or of one parameter's long data, kept for rendering.
pub const MAX_COMMAND: usize = 64 << 20;
/// MariaDB's statement id for "the statement prepared last" (a PREPARE and its EXECUTE sent
/// together, before the reply).
const LAST_PREPARED: u32 = u32::MAX;

/// Why a command's statement is not published.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatementError {
    #[error(
        "statement {id} is not known (prepared before capture began, or its reply was lost or \
         could not be matched)"
    )]
    Unknown { id: u32 },
    #[error("statement {id}: {source}")]
    Render {
        id: u32,
        #[source]
        source: RenderError,
    },
    #[error("COM_STMT_FETCH: the statement's rows were all returned by its rendered execute")]
    Fetch,
    #[error("COM_STMT_BULK_EXECUTE (MariaDB array binding) is not rendered")]
    Bulk,
    #[error("the command is cut short ({len} bytes)")]
    Short { len: usize },
}

/// What a reply head said.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The statement got its id.
    Known { id: u32 },
    /// The server refused the PREPARE (an ERR packet).
    Failed,
    /// Nothing to pair it with, or it did not match its PREPARE: nobody gets an id.
    Unmatched { why: &'static str },
}

/// The prepared statements of one connection.
#[derive(Debug, Default)]
pub struct Statements {
    known: HashMap<u32, Statement>,
    /// PREPAREs sent and not answered, oldest first; `None` for one too large to keep.
    awaiting: VecDeque<Option<Statement>>,
    /// The statement prepared last, for MariaDB's [`LAST_PREPARED`].
    latest: Option<u32>,
    /// An unknown statement, an unmatched reply was logged on this connection.
    pub warned_unknown: bool,
    pub warned_unmatched: bool,
    /// The session negotiated CLIENT_QUERY_ATTRIBUTES: bound types come with names.
    pub attributes: bool,
}

impl Statements {
    /// A COM_STMT_PREPARE's SQL (`None`: too large to keep); its reply comes later. Returns
    /// how many older PREPAREs were given up for it ([`MAX_AWAITING`]).
    pub fn prepare(&mut self, sql: Option<&[u8]>) -> usize {
        let mut lost = 0;
        while self.awaiting.len() >= MAX_AWAITING {
            self.awaiting.pop_front();
            lost += 1;
        }
        self.awaiting
            .push_back(sql.map(|sql| Statement::from_sql(sql.to_vec())));
        lost
    }

    /// PREPAREs whose reply will never be paired (the stream before them was lost): how many.
    pub fn forget_awaiting(&mut self) -> usize {
        let n = self.awaiting.len();
        self.awaiting.clear();
        n
    }

    /// The first bytes of a reply (`head`: packet header and up to 12 bytes), sent when the
    /// kernel had counted `awaiting` PREPAREs since the reply before. Only a reply to a single
    /// PREPARE is paired: with the latest this side saw. Returns what it said and how many
    /// older PREPAREs it shows were never answered (their replies missed).
    pub fn reply(&mut self, awaiting: u8, head: &[u8]) -> (Reply, usize) {
        let n = self.awaiting.len();
        if awaiting != 1 || n == 0 {
            // Several PREPAREs before one reply (pipelined, or a reply missed), or one this
            // side did not see: which statement it answers is not known.
            let lost = self.forget_awaiting();
            let why = if n == 0 {
                "no COM_STMT_PREPARE waits for it"
            } else {
                "several COM_STMT_PREPAREs were sent before it"
            };
            return (Reply::Unmatched { why }, lost);
        }
        let lost = n - 1;
        self.awaiting.drain(..lost);
        let statement = self.awaiting.pop_front().flatten();
        let status = head.get(4).copied();
        if status == Some(0xff) {
            return (Reply::Failed, lost);
        }
        // COM_STMT_PREPARE_OK: a 12-byte packet, sequence 1 (status 0, id, columns,
        // parameters, a filler, warnings: mysql_common reads it).
        let ok = head.len() >= 16 && head[..4] == [12, 0, 0, 1];
        let prepare_ok = ok
            .then(|| ParseBuf(&head[4..16]).parse::<StmtPacket>(()).ok())
            .flatten();
        let Some((mut statement, prepare_ok)) = statement.zip(prepare_ok) else {
            return (
                Reply::Unmatched {
                    why: "not a COM_STMT_PREPARE_OK, or its statement was too large",
                },
                lost,
            );
        };
        let id = prepare_ok.statement_id();
        let params = usize::from(prepare_ok.num_params());
        if params != statement.params {
            return (
                Reply::Unmatched {
                    why: "its parameter count is not the statement's",
                },
                lost,
            );
        }
        if self.known.len() >= MAX_STATEMENTS && !self.known.contains_key(&id) {
            return (
                Reply::Unmatched {
                    why: "the connection has too many statements open",
                },
                lost,
            );
        }
        statement.long_data.resize(params, None);
        self.known.insert(id, statement);
        self.latest = Some(id);
        (Reply::Known { id }, lost)
    }

    fn statement(&mut self, id: u32) -> Result<&mut Statement, StatementError> {
        let mut key = id;
        if id == LAST_PREPARED {
            // Checked first: returning the borrow from inside the `if let` would keep
            // `self` borrowed for the fallback below (a borrow checker limit).
            if matches!(self.awaiting.back(), Some(Some(_)))
                && let Some(Some(s)) = self.awaiting.back_mut()
            {
                return Ok(s);
            }
            key = self.latest.unwrap_or(id);
        }
        self.known
            .get_mut(&key)
            .ok_or(StatementError::Unknown { id })
    }

    /// A whole prepared-statement command other than PREPARE (`cmd`, `body` after the command
    /// byte): `Ok(Some(sql))` for an execute rendered as text, `Ok(None)` for one that only
    /// changes the statement, an error for what cannot be published.
    pub fn command(&mut self, cmd: u8, body: &[u8]) -> Result<Option<Vec<u8>>, StatementError> {
        let attributes = self.attributes;
        if cmd == command::STMT_BULK_EXECUTE {
            return Err(StatementError::Bulk);
        }
        let id = body
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(StatementError::Short { len: body.len() })?;
        match cmd {
            command::STMT_EXECUTE => {
                let s = self.statement(id)?;
                match s.execute(body, attributes) {
                    Ok(sql) => Ok(Some(sql)),
                    Err(source) => Err(StatementError::Render { id, source }),
                }
            }
            // Of a statement not known, these change nothing that could be published: its
            // executes are what is counted.
            command::STMT_SEND_LONG_DATA => {
                let (_, param) =
                    long_data_target(body).ok_or(StatementError::Short { len: body.len() })?;
                if let Ok(s) = self.statement(id) {
                    s.long_data(param, &body[6..]);
                }
                Ok(None)
            }
            command::STMT_RESET => {
                if let Ok(s) = self.statement(id) {
                    s.reset();
                }
                Ok(None)
            }
            command::STMT_CLOSE => {
                let id = if id == LAST_PREPARED {
                    self.latest.unwrap_or(id)
                } else {
                    id
                };
                self.known.remove(&id);
                Ok(None)
            }
            command::STMT_FETCH => Err(StatementError::Fetch),
            _ => Ok(None),
        }
    }

    /// Bytes of long data the connection's statements hold (a walk over them: asked only of
    /// connections that sent long data).
    pub fn long_bytes(&self) -> usize {
        self.known
            .values()
            .chain(self.awaiting.iter().flatten())
            .map(Statement::long_bytes)
            .sum()
    }

    /// A COM_STMT_SEND_LONG_DATA (`body` after the command byte) that there is no memory
    /// for: its parameter's long data is given up, and the statement's next execute is not
    /// rendered.
    pub fn long_data_lost(&mut self, body: &[u8]) {
        if let Some((id, param)) = long_data_target(body)
            && let Ok(s) = self.statement(id)
        {
            s.give_up_long_data(param);
        }
    }

    /// Whether a failure to render statement `id` should be logged (once per statement).
    pub fn first_failure(&mut self, id: u32) -> bool {
        match self.statement(id) {
            Ok(s) => !std::mem::replace(&mut s.warned, true),
            Err(_) => false,
        }
    }

    /// Statements the connection has open.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// The statement id and parameter a COM_STMT_SEND_LONG_DATA names (`body` after the command
/// byte).
fn long_data_target(body: &[u8]) -> Option<(u32, usize)> {
    let id = u32::from_le_bytes(body.get(..4)?.try_into().ok()?);
    let param = u16::from_le_bytes(body.get(4..6)?.try_into().ok()?);
    Some((id, param as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An execute body: id 1, no cursor, 1 iteration, NULL bitmap, bound types, values.
    fn execute(nulls: &[u8], types: Option<&[(u8, u8)]>, values: &[u8]) -> Vec<u8> {
        let mut b = vec![1, 0, 0, 0, 0, 1, 0, 0, 0];
        b.extend_from_slice(nulls);
        match types {
            Some(t) => {
                b.push(1);
                for (ty, f) in t {
                    b.extend_from_slice(&[*ty, *f]);
                }
            }
            None => b.push(0),
        }
        b.extend_from_slice(values);
        b
    }

    fn text(v: Vec<u8>) -> String {
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn every_type_becomes_its_literal() {
        const TINY: u8 = ColumnType::MYSQL_TYPE_TINY as u8;
        const SHORT: u8 = ColumnType::MYSQL_TYPE_SHORT as u8;
        const LONG: u8 = ColumnType::MYSQL_TYPE_LONG as u8;
        const LONGLONG: u8 = ColumnType::MYSQL_TYPE_LONGLONG as u8;
        const FLOAT: u8 = ColumnType::MYSQL_TYPE_FLOAT as u8;
        const DOUBLE: u8 = ColumnType::MYSQL_TYPE_DOUBLE as u8;
        const NEWDECIMAL: u8 = ColumnType::MYSQL_TYPE_NEWDECIMAL as u8;
        const VAR_STRING: u8 = ColumnType::MYSQL_TYPE_VAR_STRING as u8;
        const BLOB: u8 = ColumnType::MYSQL_TYPE_BLOB as u8;
        const DATE: u8 = ColumnType::MYSQL_TYPE_DATE as u8;
        const DATETIME: u8 = ColumnType::MYSQL_TYPE_DATETIME as u8;
        const TIME: u8 = ColumnType::MYSQL_TYPE_TIME as u8;
        let sql = b"INSERT INTO t VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)";
        let mut st = Statement::new(sql.to_vec(), 14);
        let types = [
            (TINY, 0),
            (TINY, UNSIGNED),
            (SHORT, 0),
            (LONG, 0),
            (LONGLONG, UNSIGNED),
            (FLOAT, 0),
            (DOUBLE, 0),
            (NEWDECIMAL, 0),
            (VAR_STRING, 0),
            (BLOB, 0),
            (DATE, 0),
            (DATETIME, 0),
            (TIME, 0),
            (VAR_STRING, 0),
        ];
        let mut v = vec![0xff, 0xff];
        v.extend_from_slice(&(-2i16).to_le_bytes());
        v.extend_from_slice(&(-70000i32).to_le_bytes());
        v.extend_from_slice(&u64::MAX.to_le_bytes());
        v.extend_from_slice(&1.5f32.to_le_bytes());
        v.extend_from_slice(&0.1f64.to_le_bytes());
        v.extend_from_slice(b"\x07-12.345");
        v.extend_from_slice(b"\x0ait's \\ \0\xc3\xbc");
        v.extend_from_slice(b"\x03\x00\x01\xff");
        v.extend_from_slice(&[4, 0xe8, 0x07, 2, 29]);
        v.extend_from_slice(&[11, 0xe8, 0x07, 12, 31, 23, 59, 58, 0x40, 0xe2, 0x01, 0]);
        v.extend_from_slice(&[12, 1, 1, 0, 0, 0, 2, 3, 4, 5, 0, 0, 0]);
        // The last is NULL (bit 13): no value.
        let body = execute(&[0, 0x20], Some(&types), &v);
        assert_eq!(
            text(st.execute(&body, false).unwrap()),
            "INSERT INTO t VALUES (-1,255,-2,-70000,18446744073709551615,1.5e0,1e-1,-12.345,\
             'it\\'s \\\\ \\0\u{fc}',X'0001FF','2024-02-29','2024-12-31 23:59:58.123456',\
             '-26:03:04.000005',NULL)"
        );
        // The next execute reuses the bound types.
        let mut v = vec![1, 2];
        v.extend_from_slice(&[0; 2 + 4 + 8 + 4 + 8]);
        v.extend_from_slice(b"\x011\x00\x00\x00\x00\x00\x00");
        let body = execute(&[0, 0], None, &v);
        assert_eq!(
            text(st.execute(&body, false).unwrap()),
            "INSERT INTO t VALUES (1,2,0,0,0,0e0,0e0,1,'',''\
             ,'0000-00-00','0000-00-00 00:00:00','00:00:00','')"
        );
    }

    #[test]
    fn long_data_and_placeholders_in_strings() {
        let mut st = Statement::new(b"SELECT '?', `a?`, ? /* ? */, ? -- ?\n".to_vec(), 2);
        st.long_data(1, b"ab");
        st.long_data(1, b"c");
        let body = execute(
            &[0],
            Some(&[
                (ColumnType::MYSQL_TYPE_LONG as u8, 0),
                (ColumnType::MYSQL_TYPE_BLOB as u8, 0),
            ]),
            &7i32.to_le_bytes(),
        );
        assert_eq!(
            text(st.execute(&body, false).unwrap()),
            "SELECT '?', `a?`, 7 /* ? */, X'616263' -- ?\n"
        );
        // Used up: the next execute without types bound again and without long data reads
        // the value from the packet.
        let mut v = 8i32.to_le_bytes().to_vec();
        v.extend_from_slice(b"\x01z");
        assert_eq!(
            text(st.execute(&execute(&[0], None, &v), false).unwrap()),
            "SELECT '?', `a?`, 8 /* ? */, X'7A' -- ?\n"
        );
    }

    #[test]
    fn what_cannot_be_rendered_is_an_error() {
        let mut st = Statement::new(b"SELECT ?".to_vec(), 1);
        assert_eq!(
            st.execute(&execute(&[0], None, &[]), false),
            Err(RenderError::NoTypes)
        );
        assert_eq!(
            st.execute(&execute(&[0], Some(&[(0x42, 0)]), &[1]), false),
            Err(RenderError::UnknownType { index: 0, ty: 0x42 })
        );
        // Types a client does not bind (mysql_common panics on most of them as values):
        // refused before it is asked.
        for ty in [
            ColumnType::MYSQL_TYPE_TIMESTAMP2,
            ColumnType::MYSQL_TYPE_DATETIME2,
            ColumnType::MYSQL_TYPE_TIME2,
            ColumnType::MYSQL_TYPE_TYPED_ARRAY,
            ColumnType::MYSQL_TYPE_NEWDATE,
            ColumnType::MYSQL_TYPE_VECTOR,
            ColumnType::MYSQL_TYPE_UNKNOWN,
        ] {
            let ty = ty as u8;
            assert_eq!(
                st.execute(&execute(&[0], Some(&[(ty, 0)]), &[1, 0, 0, 0]), false),
                Err(RenderError::UnknownType { index: 0, ty })
            );
        }
        assert!(matches!(
            st.execute(
                &execute(
                    &[0],
                    Some(&[(ColumnType::MYSQL_TYPE_DOUBLE as u8, 0)]),
                    &f64::NAN.to_le_bytes()
                ),
                false
            ),
            Err(RenderError::NoLiteral { .. })
        ));
        assert!(matches!(
            st.execute(
                &execute(
                    &[0],
                    Some(&[(ColumnType::MYSQL_TYPE_LONG as u8, 0)]),
                    &[1, 2]
                ),
                false
            ),
            Err(RenderError::Truncated { .. })
        ));
        let mut two = Statement::new(b"SELECT ?".to_vec(), 2);
        assert!(matches!(
            two.execute(&execute(&[3], Some(&[(6, 0), (6, 0)]), &[]), false),
            Err(RenderError::Placeholders { .. })
        ));
    }
}
