//! Recordings (`--output file:PATH`): the MRTE messages as published, each after its length
//! (4 bytes, big-endian), in files of `--output_file_mb` each: PATH, PATH.1, PATH.2, ...
//! `publish-file` sends a recording to RabbitMQ later; `inspect --from_file` reads one.

use std::{
    fs::File,
    io::{self, BufReader, BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::encode;

/// Largest message a recording may hold: what a batch can grow to (`--batch_bytes` at most
/// 64 MiB, plus one segment).
const MAX_MESSAGE: usize = (64 << 20) + (1 << 20);

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error(
        "recording {path}: the file exists; move it away or name another (--output file:PATH), \
         a recording is never overwritten or appended to"
    )]
    Exists { path: PathBuf },
    #[error("recording {path}: {call} failed")]
    Io {
        path: PathBuf,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "recording {path}: the record at byte {offset} is cut short (the recording was cut, e.g. \
         the agent was killed or the disk filled up)"
    )]
    Truncated { path: PathBuf, offset: u64 },
    #[error("recording {path}: the message at byte {offset} is not an MRTE message: {cause}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        cause: String,
    },
}

/// The file of a recording with this index: PATH, then PATH.1, PATH.2, ...
pub fn part(base: &Path, index: u32) -> PathBuf {
    if index == 0 {
        return base.to_owned();
    }
    let mut p = base.as_os_str().to_owned();
    p.push(format!(".{index}"));
    p.into()
}

/// Writes a recording; shared by the publishers, which write each message as they first
/// hand it on (a message published again after a broker outage is recorded once).
#[derive(Debug)]
pub struct Recorder {
    base: PathBuf,
    index: u32,
    file: BufWriter<File>,
    /// Bytes in the current file.
    written: u64,
    max_file: u64,
}

pub type SharedRecorder = Arc<Mutex<Recorder>>;

impl Recorder {
    /// Creates PATH; none of PATH, PATH.1, ... may exist, nor may they be unwritable.
    pub fn create(base: &Path, max_file: u64) -> Result<Self, RecordingError> {
        for index in [0, 1] {
            let path = part(base, index);
            if path.exists() {
                return Err(RecordingError::Exists { path });
            }
        }
        Ok(Self {
            base: base.to_owned(),
            index: 0,
            file: BufWriter::with_capacity(256 << 10, create_new(base)?),
            written: 0,
            max_file,
        })
    }

    /// Appends one message; moves to the next file first if this one would pass its size.
    pub fn write(&mut self, message: &[u8]) -> Result<(), RecordingError> {
        let size = 4 + message.len() as u64;
        if self.written > 0 && self.written + size > self.max_file {
            self.flush()?;
            self.index += 1;
            self.file = BufWriter::with_capacity(256 << 10, create_new(&self.path())?);
            self.written = 0;
        }
        let len = u32::try_from(message.len()).expect("messages are far below 4 GiB");
        self.file
            .write_all(&len.to_be_bytes())
            .and_then(|()| self.file.write_all(message))
            .map_err(self.io("write"))?;
        self.written += size;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), RecordingError> {
        self.file.flush().map_err(self.io("write"))
    }

    /// The file being written.
    pub fn path(&self) -> PathBuf {
        part(&self.base, self.index)
    }

    fn io(&self, call: &'static str) -> impl FnOnce(io::Error) -> RecordingError {
        let path = self.path();
        move |source| RecordingError::Io { path, call, source }
    }
}

fn create_new(path: &Path) -> Result<File, RecordingError> {
    File::create_new(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            RecordingError::Exists {
                path: path.to_owned(),
            }
        } else {
            RecordingError::Io {
                path: path.to_owned(),
                call: "create",
                source,
            }
        }
    })
}

/// Reads a recording's messages in order, over all its files, each checked to be an MRTE
/// message.
#[derive(Debug)]
pub struct Reader {
    base: PathBuf,
    index: u32,
    file: Option<BufReader<File>>,
    offset: u64,
    /// Files opened so far.
    pub files: u32,
}

impl Reader {
    pub fn open(base: &Path) -> Result<Self, RecordingError> {
        let file = File::open(base).map_err(|source| RecordingError::Io {
            path: base.to_owned(),
            call: "open",
            source,
        })?;
        Ok(Self {
            base: base.to_owned(),
            index: 0,
            file: Some(BufReader::with_capacity(256 << 10, file)),
            offset: 0,
            files: 1,
        })
    }

    /// The next message, or None after the last file's last one.
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, RecordingError> {
        loop {
            let Some(file) = self.file.as_mut() else {
                return Ok(None);
            };
            let path = part(&self.base, self.index);
            let mut len = [0u8; 4];
            match read_full(file, &mut len).map_err(|source| RecordingError::Io {
                path: path.clone(),
                call: "read",
                source,
            })? {
                0 => {
                    // This file is done; the next one, if the recording went on.
                    let next = part(&self.base, self.index + 1);
                    self.file = match File::open(&next) {
                        Ok(f) => Some(BufReader::with_capacity(256 << 10, f)),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                        Err(source) => {
                            return Err(RecordingError::Io {
                                path: next,
                                call: "open",
                                source,
                            });
                        }
                    };
                    if self.file.is_some() {
                        self.files += 1;
                    }
                    self.index += 1;
                    self.offset = 0;
                    continue;
                }
                4 => {}
                _ => {
                    return Err(RecordingError::Truncated {
                        path,
                        offset: self.offset,
                    });
                }
            }
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_MESSAGE {
                return Err(RecordingError::Corrupt {
                    path,
                    offset: self.offset,
                    cause: format!("a length of {len} bytes"),
                });
            }
            let mut message = vec![0; len];
            let got = read_full(file, &mut message).map_err(|source| RecordingError::Io {
                path: path.clone(),
                call: "read",
                source,
            })?;
            if got < len {
                return Err(RecordingError::Truncated {
                    path,
                    offset: self.offset,
                });
            }
            if let Err(e) = encode::decode_message(&message) {
                return Err(RecordingError::Corrupt {
                    path,
                    offset: self.offset,
                    cause: e.to_string(),
                });
            }
            self.offset += 4 + len as u64;
            return Ok(Some(message));
        }
    }
}

/// Reads until `buf` is full or the file ends; how many bytes were read.
fn read_full(r: &mut impl io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn message(i: u16) -> Vec<u8> {
        encode::encode_message(
            Ipv4Addr::LOCALHOST,
            &[encode::Unit {
                ip: Ipv4Addr::new(10, 0, 0, 1),
                port: i,
                data: vec![i as u8; 100 + i as usize],
            }],
        )
        .to_vec()
    }

    #[test]
    fn a_recording_reads_back_in_order_across_its_files() {
        let dir = tempdir();
        let base = dir.join("rec");
        let mut r = Recorder::create(&base, 1000).unwrap();
        let sent: Vec<Vec<u8>> = (0..40).map(message).collect();
        for m in &sent {
            r.write(m).unwrap();
        }
        r.flush().unwrap();
        assert!(part(&base, 3).exists(), "rotated by size");
        for i in 0.. {
            let p = part(&base, i);
            let Ok(meta) = std::fs::metadata(&p) else {
                break;
            };
            assert!(
                meta.len() <= 1000,
                "{} is {} bytes",
                p.display(),
                meta.len()
            );
        }
        let mut reader = Reader::open(&base).unwrap();
        let mut got = Vec::new();
        while let Some(m) = reader.next_message().unwrap() {
            got.push(m);
        }
        assert_eq!(got, sent);
        // Never overwritten.
        assert!(matches!(
            Recorder::create(&base, 1000),
            Err(RecordingError::Exists { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cut_or_damaged_recording_is_an_error() {
        let dir = tempdir();
        let base = dir.join("rec");
        let mut r = Recorder::create(&base, 1 << 20).unwrap();
        r.write(&message(1)).unwrap();
        r.write(&message(2)).unwrap();
        r.flush().unwrap();
        let whole = std::fs::read(&base).unwrap();
        std::fs::write(&base, &whole[..whole.len() - 3]).unwrap();
        let mut reader = Reader::open(&base).unwrap();
        assert!(reader.next_message().unwrap().is_some());
        assert!(matches!(
            reader.next_message(),
            Err(RecordingError::Truncated { offset, .. }) if offset == 4 + message(1).len() as u64
        ));
        let mut bad = whole.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff; // the second message's checksum
        std::fs::write(&base, &bad).unwrap();
        let mut reader = Reader::open(&base).unwrap();
        reader.next_message().unwrap();
        assert!(matches!(
            reader.next_message(),
            Err(RecordingError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mrte-rec-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
