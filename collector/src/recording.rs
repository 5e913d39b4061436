//! Recordings (`--output file:PATH`): the MRTE messages as published, each after its length
//! (4 bytes, big-endian), in files of `--output_file_mb` each: PATH, PATH.1, PATH.2, ...
//! `publish-file` sends a recording to RabbitMQ later; `inspect --from_file` reads one.
//! PATH may also be a FIFO that another process reads (a compressor, a copy to another
//! host): the messages then go there as one stream.
//!
//! The files are written on a thread of their own ([`RecordingWriter`]): a slow disk or a
//! slow reader holds up the recording only, never the drain or the publishers.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufReader, BufWriter, Write as _},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use bytes::Bytes;

use crate::{encode, memory::MemoryBudget, publish::Throttled, status::PipelineCounters};

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
    #[error("recording {path}: the FIFO has no reader; start the process that reads it first")]
    NoReader { path: PathBuf },
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

/// Writes a recording, message by message (the publishers hand each on as they first publish
/// it: a message published again after a broker outage is recorded once).
#[derive(Debug)]
pub struct Recorder {
    base: PathBuf,
    index: u32,
    file: BufWriter<File>,
    /// Bytes in the current file.
    written: u64,
    max_file: u64,
    /// PATH is a FIFO: one stream, never cut into files.
    pipe: bool,
}

impl Recorder {
    /// Creates PATH; none of PATH, PATH.1, ... may exist, nor may they be unwritable. Or opens
    /// PATH if it is a FIFO that a process reads.
    pub fn create(base: &Path, max_file: u64) -> Result<Self, RecordingError> {
        if let Some(fifo) = open_fifo(base)? {
            return Ok(Self {
                base: base.to_owned(),
                index: 0,
                file: BufWriter::with_capacity(256 << 10, fifo),
                written: 0,
                max_file,
                pipe: true,
            });
        }
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
            pipe: false,
        })
    }

    /// Appends one message; moves to the next file first if this one would pass its size.
    pub fn write(&mut self, message: &[u8]) -> Result<(), RecordingError> {
        let size = 4 + message.len() as u64;
        if !self.pipe && self.written > 0 && self.written + size > self.max_file {
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

/// PATH opened for writing if it is a FIFO; None if it is anything else (or nothing).
fn open_fifo(path: &Path) -> Result<Option<File>, RecordingError> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_fifo() => {}
        _ => return Ok(None),
    }
    let io = |call| {
        move |source| RecordingError::Io {
            path: path.to_owned(),
            call,
            source,
        }
    };
    // Non-blocking, the open fails at once (ENXIO) when nothing reads the FIFO, instead of
    // waiting for a reader.
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENXIO) => RecordingError::NoReader {
                path: path.to_owned(),
            },
            _ => io("open")(source),
        })?;
    // Writes wait for the reader (on the writer's own thread).
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| io("fcntl")(e.into()))?;
    Ok(Some(file))
}

/// Where the publishers queue messages for the recording's thread.
#[derive(Clone, Debug)]
pub struct RecordingQueue {
    tx: mpsc::Sender<Job>,
    shared: Arc<WriterShared>,
}

#[derive(Debug)]
struct WriterShared {
    budget: Arc<MemoryBudget>,
    counters: Arc<PipelineCounters>,
    /// Units queued and not written yet.
    queued_units: AtomicU64,
}

#[derive(Debug)]
struct Job {
    message: Bytes,
    units: u64,
    /// Bytes of the memory budget it holds until written.
    budgeted: u64,
}

impl RecordingQueue {
    /// Queues a message that holds `budgeted` bytes of the memory budget already (the
    /// publisher hands its batch's share on); given back once written.
    pub fn push_budgeted(&self, message: Bytes, units: u64, budgeted: u64) {
        self.shared.queued_units.fetch_add(units, Ordering::Relaxed);
        let job = Job {
            message,
            units,
            budgeted,
        };
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            // The writer is gone (it only ends when every queue is dropped): not reached.
            self.shared.gone(job);
        }
    }

    /// Queues a message that the publisher keeps too (for the broker): its bytes are taken
    /// from the budget again while the writer holds them. Without room it is left out of the
    /// recording (false), counted in `record_errors`: the writer is that far behind.
    pub fn push(&self, message: Bytes, units: u64) -> bool {
        let n = message.len() as u64;
        if !self.shared.budget.try_take(n) {
            PipelineCounters::add(&self.shared.counters.record_errors, 1);
            PipelineCounters::add(&self.shared.counters.record_error_units, units);
            return false;
        }
        self.push_budgeted(message, units, n);
        true
    }
}

impl WriterShared {
    fn gone(&self, job: Job) {
        self.budget.give_back(job.budgeted);
        self.queued_units.fetch_sub(job.units, Ordering::Relaxed);
    }
}

/// The recording's thread: writes what the queue holds, flushing whenever it has caught up
/// (so what was recorded is on disk soon, and a quiet agent's recording is complete).
#[derive(Debug)]
pub struct RecordingWriter {
    thread: std::thread::JoinHandle<()>,
    shared: Arc<WriterShared>,
    path: PathBuf,
}

impl RecordingWriter {
    pub fn start(
        recorder: Recorder,
        budget: Arc<MemoryBudget>,
        counters: Arc<PipelineCounters>,
    ) -> io::Result<(Self, RecordingQueue)> {
        let shared = Arc::new(WriterShared {
            budget,
            counters,
            queued_units: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let path = recorder.path();
        let thread = std::thread::Builder::new()
            .name("recording".into())
            .spawn({
                let shared = shared.clone();
                move || write_all(recorder, &rx, &shared)
            })?;
        Ok((
            Self {
                thread,
                shared: shared.clone(),
                path,
            },
            RecordingQueue { tx, shared },
        ))
    }

    /// Waits (up to `grace`) for the writer to write and flush what was queued; call once
    /// every queue is dropped. What it could not write by then (a FIFO's reader that stopped
    /// reading) is counted in `record_error_units`.
    pub async fn finish(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while !self.thread.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
            return;
        }
        let units = self.shared.queued_units.load(Ordering::Relaxed);
        PipelineCounters::add(&self.shared.counters.record_error_units, units);
        PipelineCounters::add(&self.shared.counters.record_errors, 1);
        tracing::error!(
            path = %self.path.display(),
            units,
            "the recording was not written to the end within {grace:?} (its disk or reader \
             is stalled): the last messages are missing from it"
        );
    }
}

fn write_all(mut recorder: Recorder, rx: &mpsc::Receiver<Job>, shared: &WriterShared) {
    let c = &shared.counters;
    let mut errors = Throttled::default();
    let flush = |recorder: &mut Recorder, errors: &mut Throttled| {
        if let Err(e) = recorder.flush() {
            // What the buffer held may be missing from the recording.
            PipelineCounters::add(&c.record_errors, 1);
            errors.hit(tokio::time::Instant::now(), |more| {
                tracing::error!(similar_since_last_error = more, "{e}")
            });
        }
    };
    loop {
        let job = match rx.try_recv() {
            Ok(job) => job,
            Err(mpsc::TryRecvError::Empty) => {
                flush(&mut recorder, &mut errors);
                match rx.recv() {
                    Ok(job) => job,
                    Err(mpsc::RecvError) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        match recorder.write(&job.message) {
            Ok(()) => {
                PipelineCounters::add(&c.recorded_msgs, 1);
                PipelineCounters::add(&c.recorded_bytes, 4 + job.message.len() as u64);
            }
            Err(e) => {
                PipelineCounters::add(&c.record_errors, 1);
                PipelineCounters::add(&c.record_error_units, job.units);
                errors.hit(tokio::time::Instant::now(), |more| {
                    tracing::error!(
                        similar_since_last_error = more,
                        "a message is missing from the recording: {e}"
                    )
                });
            }
        }
        shared.gone(job);
    }
    flush(&mut recorder, &mut errors);
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

    /// A FIFO needs a reader when the recording starts; then the writer's thread streams the
    /// messages to it in order, whatever the reader's pace, giving the budget back as it
    /// writes; what a stalled reader never takes is counted at the end.
    #[tokio::test]
    async fn a_fifo_recording_streams_from_its_own_thread() {
        let dir = tempdir();
        let base = dir.join("fifo");
        nix::unistd::mkfifo(&base, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(
            Recorder::create(&base, 1000),
            Err(RecordingError::NoReader { .. })
        ));
        // Blocked in its open, the reader counts as one.
        let reader = std::thread::spawn({
            let base = base.clone();
            move || {
                let mut f = File::open(&base).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 512];
                loop {
                    // Slow: 512 bytes, then a pause.
                    match io::Read::read(&mut f, &mut buf).unwrap() {
                        0 => break got,
                        n => got.extend_from_slice(&buf[..n]),
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        let recorder = loop {
            match Recorder::create(&base, 1000) {
                Err(RecordingError::NoReader { .. }) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                r => break r.unwrap(),
            }
        };
        let budget = Arc::new(MemoryBudget::new(1 << 20));
        let counters = Arc::new(PipelineCounters::default());
        let (writer, queue) =
            RecordingWriter::start(recorder, budget.clone(), counters.clone()).unwrap();
        let sent: Vec<Vec<u8>> = (0..40).map(message).collect();
        for m in &sent {
            // The caller's own copy, as a publisher to the broker keeps.
            assert!(queue.push(Bytes::from(m.clone()), 1));
        }
        // Queued at once, while the reader is far behind; not cut into files.
        assert!(budget.used() > 0);
        drop(queue);
        writer.finish(Duration::from_secs(20)).await;
        assert_eq!(budget.used(), 0);
        let got = reader.join().unwrap();
        let mut want = Vec::new();
        for m in &sent {
            want.extend_from_slice(&(m.len() as u32).to_be_bytes());
            want.extend_from_slice(m);
        }
        assert!(got == want, "the stream differs");
        assert!(!part(&base, 1).exists());
        assert_eq!(counters.recorded_msgs.load(Ordering::Relaxed), 40);
        assert_eq!(counters.record_errors.load(Ordering::Relaxed), 0);

        // A reader that stops reading: the budget bounds the queue, the rest is counted.
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let stalled = std::thread::spawn({
            let base = base.clone();
            move || {
                let f = File::open(&base).unwrap();
                let _ = stop_rx.recv();
                drop(f);
            }
        });
        let recorder = loop {
            match Recorder::create(&base, 1000) {
                Err(RecordingError::NoReader { .. }) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                r => break r.unwrap(),
            }
        };
        let budget = Arc::new(MemoryBudget::new(300 << 10));
        let counters = Arc::new(PipelineCounters::default());
        let (writer, queue) =
            RecordingWriter::start(recorder, budget.clone(), counters.clone()).unwrap();
        let big = Bytes::from(vec![7u8; 100 << 10]);
        let taken = (0..20).filter(|_| queue.push(big.clone(), 1)).count() as u64;
        // The pipe and the writer's buffer take ~320 KiB, the queue 300 KiB more.
        assert!((3..12).contains(&taken), "{taken}");
        assert_eq!(
            counters.record_error_units.load(Ordering::Relaxed),
            20 - taken
        );
        drop(queue);
        writer.finish(Duration::from_millis(300)).await;
        let unwritten = counters.record_error_units.load(Ordering::Relaxed) - (20 - taken);
        assert!(unwritten > 0, "the stalled reader took everything");
        stop_tx.send(()).unwrap();
        stalled.join().unwrap();
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
