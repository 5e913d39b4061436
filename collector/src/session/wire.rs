//! What a client's bytes are before they are MySQL packets. Most sessions send the packets as
//! they are. A TLS session sends them encrypted: the ciphertext is left out (a player cannot
//! replay it) and counted. A compressed session (CLIENT_COMPRESS, zlib or zstd) sends them in
//! compressed frames after its authentication: they are inflated here, so that the packet
//! follower sees the packets the client wrote.
//!
//! A compressed frame: 3-byte little-endian length of what follows the header, a sequence
//! number, the 3-byte length of the payload once inflated (0: sent as it is), the payload.

use bytes::Bytes;
use flate2::{Decompress, FlushDecompress, Status};

use crate::{
    protocol::{HEADER, is_handshake_response},
    status::PipelineCounters,
};

/// Bytes of a compressed frame's header.
pub const FRAME_HEADER: usize = 7;
/// The zstd frame magic number, little-endian on the wire.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest TLS record (2^14 bytes of plaintext and the expansion RFC 8446 allows).
const TLS_MAX_RECORD: usize = (1 << 14) + 256;

/// Why a session's bytes cannot be read further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a compressed frame of {len} bytes does not inflate to {expected} bytes: {why}")]
    Inflate {
        len: usize,
        expected: usize,
        why: String,
    },
}

/// The session's wire.
#[derive(Debug, Default)]
pub(crate) enum Wire {
    /// Nothing seen yet: the first bytes tell (a handshake, TLS records, compressed frames).
    #[default]
    Unknown,
    Plain,
    /// The handshake response asked for compression: the client's authentication packets
    /// (sequence numbers past 0) are still plain; its first command starts the frames.
    Auth {
        /// Payload bytes left of the plain packet under way.
        left: usize,
        /// A header cut by a segment end.
        head: Vec<u8>,
    },
    Compressed(Box<Inflater>),
    /// Encrypted: left out.
    Tls,
    /// Cannot be read further: left out.
    Broken,
}

impl Wire {
    /// Decides an unknown wire from the first bytes of a session.
    pub(crate) fn classify(data: &[u8], c: &PipelineCounters) -> Self {
        if is_handshake_response(data) {
            Wire::Plain
        } else if starts_tls_record(data) {
            PipelineCounters::add(&c.tls_sessions, 1);
            Wire::Tls
        } else if starts_frame(data) {
            PipelineCounters::add(&c.compressed_sessions, 1);
            Wire::Compressed(Box::default())
        } else {
            Wire::Plain
        }
    }

    /// Bytes went missing: framing resumes at the next segment that starts a frame.
    pub(crate) fn resync(&mut self) {
        match self {
            Wire::Compressed(inflater) => inflater.resync(),
            // An authentication packet lost: its frames start at a segment start, too.
            Wire::Auth { .. } => *self = Wire::Compressed(Box::new(Inflater::resyncing())),
            _ => {}
        }
    }

    /// The packet bytes in `data` (not [`Wire::Plain`], which the caller takes as they are),
    /// appended to `out`.
    pub(crate) fn unwrap(
        &mut self,
        data: Bytes,
        c: &PipelineCounters,
        out: &mut Vec<Bytes>,
    ) -> Result<(), WireError> {
        match self {
            Wire::Unknown | Wire::Plain => out.push(data),
            Wire::Tls => PipelineCounters::add(&c.tls_bytes, data.len() as u64),
            Wire::Broken => PipelineCounters::add(&c.unreplayable_bytes, data.len() as u64),
            Wire::Compressed(inflater) => {
                let r = inflater.push(&data, c, out);
                if r.is_err() {
                    *self = Wire::Broken;
                }
                return r;
            }
            Wire::Auth { left, head } => {
                let mut i = 0;
                while i < data.len() {
                    if *left > 0 {
                        let n = (*left).min(data.len() - i);
                        out.push(data.slice(i..i + n));
                        *left -= n;
                        i += n;
                        continue;
                    }
                    let need = HEADER - head.len();
                    let take = need.min(data.len() - i);
                    head.extend_from_slice(&data[i..i + take]);
                    if head.len() < HEADER {
                        return Ok(());
                    }
                    if head[3] == 0 {
                        // The first command: frames from here, this header the first's.
                        let mut inflater = Box::<Inflater>::default();
                        let head = std::mem::take(head);
                        let r = inflater
                            .push(&head, c, out)
                            .and_then(|()| inflater.push(&data[i + take..], c, out));
                        *self = if r.is_ok() {
                            Wire::Compressed(inflater)
                        } else {
                            Wire::Broken
                        };
                        return r;
                    }
                    i += take;
                    *left = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
                    out.push(Bytes::from(std::mem::take(head)));
                }
            }
        }
        Ok(())
    }
}

/// Whether `data` starts with TLS records (handshake, alert, application data, change cipher
/// spec; version 3.x). A command packet can look like one record header (a 788-byte
/// COM_QUERY starts `14 03 00 00 03`), so the records must chain: each header where the one
/// before ends, to the segment's end; a single record that runs past the segment counts only
/// when the bytes cannot be a command packet (sequence 0, a command byte).
pub fn starts_tls_record(data: &[u8]) -> bool {
    let (mut at, mut records) = (0usize, 0);
    while let Some(&[ty, 3, minor, hi, lo]) = data
        .get(at..at + 5)
        .map(|h| <&[u8; 5]>::try_from(h).unwrap())
    {
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if !(0x14..=0x17).contains(&ty) || minor > 4 || len == 0 || len > TLS_MAX_RECORD {
            return false;
        }
        records += 1;
        at += 5 + len;
    }
    // The segment may end inside the next record's header.
    let cut_header = data.get(at..).is_some_and(|rest| {
        !rest.is_empty() && (0x14..=0x17).contains(&rest[0]) && rest.get(1).is_none_or(|&v| v == 3)
    });
    if records == 0 || (at < data.len() && !cut_header) {
        // No header, or one that does not parse where the records say the next starts.
        return false;
    }
    let command_packet = data[3] == 0 && data[4] <= 0x1f;
    records >= 2 || cut_header || at == data.len() || !command_packet
}

fn le3(b: &[u8]) -> usize {
    u32::from_le_bytes([b[0], b[1], b[2], 0]) as usize
}

/// Whether `data` starts with a compressed frame: a frame sent as it is holds a command packet
/// (read as a plain packet, its command byte would be 0, which clients never send); a
/// compressed one starts with a zlib or zstd header and, when it is whole here, inflates.
pub fn starts_frame(data: &[u8]) -> bool {
    if data.len() < FRAME_HEADER + 2 {
        return false;
    }
    let (len, inflated) = (le3(data), le3(&data[4..]));
    let payload = &data[FRAME_HEADER..];
    if len == 0 {
        return false;
    }
    if inflated == 0 {
        // A plain packet inside: header (sequence 0) and command byte.
        return payload.len() > HEADER
            && le3(payload) + HEADER <= len
            && payload[3] == 0
            && payload[4] <= 0x1f;
    }
    let zlib =
        payload[0] & 0x0f == 8 && u16::from_be_bytes([payload[0], payload[1]]).is_multiple_of(31);
    if !zlib && !payload.starts_with(&ZSTD_MAGIC) {
        return false;
    }
    match payload.get(..len) {
        Some(whole) => inflate(whole, inflated, &mut None).is_ok(),
        // Cut by the segment end: what is here must at least begin a valid stream.
        None if zlib => {
            let mut out = Vec::with_capacity(inflated.min(64 << 10));
            Decompress::new(true)
                .decompress_vec(payload, &mut out, FlushDecompress::None)
                .is_ok()
        }
        None => true,
    }
}

/// Inflates one frame's payload to exactly `expected` bytes; zlib or zstd by its magic.
fn inflate(
    payload: &[u8],
    expected: usize,
    zlib: &mut Option<Decompress>,
) -> Result<Vec<u8>, WireError> {
    let fail = |why: String| WireError::Inflate {
        len: payload.len(),
        expected,
        why,
    };
    let out = if payload.starts_with(&ZSTD_MAGIC) {
        zstd::bulk::decompress(payload, expected).map_err(|e| fail(format!("zstd: {e}")))?
    } else {
        let z = zlib.get_or_insert_with(|| Decompress::new(true));
        z.reset(true);
        let mut out = Vec::with_capacity(expected);
        match z.decompress_vec(payload, &mut out, FlushDecompress::Finish) {
            Ok(Status::StreamEnd) => {}
            Ok(s) => return Err(fail(format!("zlib stream not ended ({s:?})"))),
            Err(e) => return Err(fail(format!("zlib: {e}"))),
        }
        out
    };
    if out.len() != expected {
        return Err(fail(format!("{} bytes came out", out.len())));
    }
    Ok(out)
}

/// Cuts compressed frames and inflates them.
#[derive(Default)]
pub(crate) struct Inflater {
    /// A frame not yet whole.
    buf: Vec<u8>,
    /// After a gap: bytes are left out until a segment starts with a frame.
    resync: bool,
    zlib: Option<Decompress>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("buffered", &self.buf.len())
            .field("resync", &self.resync)
            .finish()
    }
}

impl Inflater {
    fn resyncing() -> Self {
        Self {
            resync: true,
            ..Default::default()
        }
    }

    fn resync(&mut self) {
        self.buf.clear();
        self.resync = true;
    }

    fn push(
        &mut self,
        data: &[u8],
        c: &PipelineCounters,
        out: &mut Vec<Bytes>,
    ) -> Result<(), WireError> {
        if data.is_empty() {
            return Ok(());
        }
        if self.resync {
            if !starts_frame(data) {
                PipelineCounters::add(&c.gap_bytes, data.len() as u64);
                return Ok(());
            }
            self.resync = false;
        }
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while self.buf.len() - at >= FRAME_HEADER {
            let frame = &self.buf[at..];
            let (len, inflated) = (le3(frame), le3(&frame[4..]));
            let Some(payload) = frame.get(FRAME_HEADER..FRAME_HEADER + len) else {
                break;
            };
            let packets = if inflated == 0 {
                Bytes::copy_from_slice(payload)
            } else {
                match inflate(payload, inflated, &mut self.zlib) {
                    Ok(p) => Bytes::from(p),
                    Err(e) => {
                        // This frame and what came after it are left out.
                        let rest = self.buf.len() - at;
                        PipelineCounters::add(&c.unreplayable_bytes, rest as u64);
                        self.buf = Vec::new();
                        return Err(e);
                    }
                }
            };
            PipelineCounters::add(&c.inflated_bytes, packets.len() as u64);
            out.push(packets);
            at += FRAME_HEADER + len;
        }
        self.buf.drain(..at);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write as _;

    use super::*;

    /// `packets` in one compressed frame: zlib, zstd, or as they are.
    pub(crate) fn frame(seq: u8, packets: &[u8], how: &str) -> Vec<u8> {
        let (payload, inflated) = match how {
            "zlib" => {
                let mut z = flate2::write::ZlibEncoder::new(Vec::new(), Default::default());
                z.write_all(packets).unwrap();
                (z.finish().unwrap(), packets.len())
            }
            "zstd" => (zstd::bulk::compress(packets, 3).unwrap(), packets.len()),
            _ => (packets.to_vec(), 0),
        };
        let mut f = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        f.push(seq);
        f.extend_from_slice(&(inflated as u32).to_le_bytes()[..3]);
        f.extend_from_slice(&payload);
        f
    }

    fn run(wire: &mut Wire, data: &[u8], cut: usize) -> (Vec<u8>, Result<(), WireError>) {
        let c = PipelineCounters::default();
        let mut out = Vec::new();
        let mut r = wire.unwrap(Bytes::copy_from_slice(&data[..cut]), &c, &mut out);
        if r.is_ok() {
            r = wire.unwrap(Bytes::copy_from_slice(&data[cut..]), &c, &mut out);
        }
        (out.concat(), r)
    }

    #[test]
    fn frames_inflate_wherever_the_segments_are_cut() {
        let q = crate::protocol::packet(0, b"\x03SELECT 1");
        let big = crate::protocol::packet(0, &[b'x'; 3000]);
        let stream = [
            frame(0, &q, "plain"),
            frame(0, &big, "zlib"),
            frame(0, &q, "zstd"),
        ]
        .concat();
        let want = [q.clone(), big.clone(), q.clone()].concat();
        for cut in 0..stream.len() {
            let mut wire = Wire::Compressed(Box::default());
            let (got, r) = run(&mut wire, &stream, cut);
            assert_eq!(r, Ok(()), "cut at {cut}");
            assert!(got == want, "cut at {cut}");
        }
        // Authentication packets first, then frames.
        let auth = crate::protocol::packet(3, &[1; 20]);
        let stream = [auth.clone(), frame(0, &q, "zlib")].concat();
        for cut in 0..stream.len() {
            let mut wire = Wire::Auth {
                left: 0,
                head: Vec::new(),
            };
            let (got, r) = run(&mut wire, &stream, cut);
            assert_eq!(r, Ok(()), "cut at {cut}");
            assert_eq!(got, [auth.clone(), q.clone()].concat(), "cut at {cut}");
        }
    }

    #[test]
    fn a_frame_that_does_not_inflate_breaks_the_wire() {
        let mut bad = frame(0, &crate::protocol::packet(0, b"\x03SELECT 1"), "zlib");
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        let mut wire = Wire::Compressed(Box::default());
        let (_, r) = run(&mut wire, &bad, 0);
        assert!(matches!(r, Err(WireError::Inflate { .. })), "{r:?}");
        assert!(matches!(wire, Wire::Broken));
    }

    #[test]
    fn the_first_bytes_tell_the_wire() {
        let c = PipelineCounters::default();
        let q = crate::protocol::packet(0, b"\x03SELECT * FROM peeps");
        for (data, want) in [
            (q.clone(), "plain"),
            (frame(0, &q, "plain"), "compressed"),
            (frame(0, &q, "zlib"), "compressed"),
            (frame(0, &q, "zstd"), "compressed"),
            (vec![0x17, 3, 3, 0, 0x40, 1, 2, 3], "tls"),
            (vec![0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc], "tls"),
            // A 788-byte COM_QUERY's header reads as a 3-byte record; the next does not chain.
            (
                crate::protocol::packet(0, &[&[3u8][..], &[b'a'; 787]].concat()),
                "plain",
            ),
            // Records that chain, the last cut inside its header.
            ([&[0x17, 3, 3, 0, 2, 9, 9][..], &[0x17, 3]].concat(), "tls"),
        ] {
            let got = match Wire::classify(&data, &c) {
                Wire::Plain => "plain",
                Wire::Compressed(_) => "compressed",
                Wire::Tls => "tls",
                w => panic!("{w:?}"),
            };
            assert_eq!(got, want, "{data:02x?}");
        }
        let l = c.load();
        assert_eq!((l.compressed_sessions, l.tls_sessions), (3, 3));
    }
}
