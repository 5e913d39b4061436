//! One agent per interface, and what a dead one left behind.
//!
//! An agent holds an exclusive `flock` on `/run/mrte-collector/<netns>-<interface>.lock` while
//! it runs and removes the file as it exits; the kernel drops the lock when the process dies,
//! however it dies (the file then stays, saying what the dead agent left). A second agent on
//! the same interface (same network namespace) is refused with the first one's pid and ports:
//! one agent captures up to 16 ports, so there is no reason for two, and two would publish
//! every segment twice.
//!
//! A TCX link is the agent's file descriptor, so the kernel removes it with the process. The
//! netlink fallback's filter and clsact qdisc outlive a SIGKILL: the agent that gets the lock
//! next removes every ingress filter named [`PROGRAM_NAME`] and egress filter named
//! [`REPLIES_PROGRAM_NAME`] on the interface whose program no live process holds (an
//! `inspect`'s is held by it; no other agent can run there: it would hold the lock) and, if
//! the lock file says the dead agent added the qdisc, the qdisc too once no filter of anyone
//! else's is left on it. Other filters are never touched.

use std::{
    fs::File,
    io::Read as _,
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::PathBuf,
};

use nix::fcntl::{Flock, FlockArg};

use crate::capture::{
    PROGRAM_NAME, REPLIES_PROGRAM_NAME, bpf_filters, delete_filter, has_clsact, held_programs,
    remove_clsact_if_unused,
};

pub const LOCK_DIR: &str = "/run/mrte-collector";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "cannot use the instance lock {path}: {source}. The agent keeps one lock per \
         interface in {LOCK_DIR}; run it as root, or make {LOCK_DIR} writable for its user"
    )]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another mrte-collector (pid {pid}, --port {ports}) is already capturing on \
         {interface}: stop it first, or give it this agent's ports too (--port takes a list \
         of up to 16); two agents on one interface would publish every segment twice"
    )]
    Busy {
        interface: String,
        pid: String,
        ports: String,
    },
}

/// What the lock file says: the holder's pid and ports, and whether the clsact qdisc on the
/// interface is the holder's to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Holder {
    pid: String,
    ports: String,
    clsact: bool,
}

impl Holder {
    /// The first value of each key counts: what follows the holder's last write may be the
    /// tail of a longer text written before it (see [`Instance::write`]).
    fn parse(s: &str) -> Self {
        let mut h = Self::default();
        let mut clsact = None;
        for line in s.lines() {
            match line.split_once('=') {
                Some(("pid", v)) if h.pid.is_empty() => h.pid = v.into(),
                Some(("ports", v)) if h.ports.is_empty() => h.ports = v.into(),
                Some(("clsact", v)) if clsact.is_none() => clsact = Some(v == "1"),
                _ => {}
            }
        }
        h.clsact = clsact.unwrap_or(false);
        h
    }

    fn render(&self) -> String {
        format!(
            "pid={}\nports={}\nclsact={}\n",
            self.pid, self.ports, self.clsact as u8
        )
    }
}

/// The lock of this agent's interface, held until drop.
pub struct Instance {
    lock: Flock<File>,
    path: PathBuf,
    interface: String,
    me: Holder,
    /// What the previous holder wrote, if it did not exit cleanly (or left a qdisc in use).
    predecessor: Option<Holder>,
    /// `me.clsact` set by [`Self::attaching`], not yet by what the attach did.
    premarked: bool,
}

impl Instance {
    /// Takes the interface's lock, or says who holds it.
    pub fn acquire(interface: &str, ports: &[u16]) -> Result<Self, InstanceError> {
        let lock_err = |path: &PathBuf, source| InstanceError::Lock {
            path: path.clone(),
            source,
        };
        let netns = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        let path = PathBuf::from(format!("{LOCK_DIR}/net{netns}-{interface}.lock"));
        std::fs::create_dir_all(LOCK_DIR).map_err(|e| lock_err(&path, e))?;
        let mut lock = loop {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| lock_err(&path, e))?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut s = String::new();
                    let _ = file.read_to_string(&mut s);
                    let h = Holder::parse(&s);
                    return Err(InstanceError::Busy {
                        interface: interface.into(),
                        pid: h.pid,
                        ports: h.ports,
                    });
                }
                Err((_, e)) => return Err(lock_err(&path, e.into())),
            };
            // The holder before us removes the file as it exits: a lock on a file no longer
            // at the path locks nothing, so open it again.
            let here = std::fs::metadata(&path).map(|m| m.ino()).ok();
            let ours = lock.metadata().map(|m| m.ino()).ok();
            if here.is_some() && here == ours {
                break lock;
            }
        };
        let mut s = String::new();
        lock.read_to_string(&mut s)
            .map_err(|e| lock_err(&path, e))?;
        let predecessor = (!s.trim().is_empty()).then(|| Holder::parse(&s));
        let me = Holder {
            pid: std::process::id().to_string(),
            ports: ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
            clsact: predecessor.as_ref().is_some_and(|p| p.clsact),
        };
        let mut this = Self {
            lock,
            path,
            interface: interface.into(),
            me,
            predecessor,
            premarked: false,
        };
        this.write();
        Ok(this)
    }

    /// Removes what an agent that did not exit cleanly left on the interface: its netlink
    /// filter(s), by name, and the clsact qdisc it added once nobody else's filter is on it
    /// (until then, this agent takes over removing it). Returns how many hooks it removed.
    pub fn clean_up(&mut self) -> usize {
        let mut removed = 0;
        let dead = self
            .predecessor
            .as_ref()
            .map_or_else(|| "unknown".into(), |p| p.pid.clone());
        // Read only if there is a filter to judge: it walks every process's descriptors.
        let mut held = None;
        for (egress, side_name, name) in [
            (false, "ingress", PROGRAM_NAME),
            (true, "egress", REPLIES_PROGRAM_NAME),
        ] {
            let filters = match bpf_filters(&self.interface, egress, name) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(
                        interface = %self.interface,
                        "could not look for filters a previous agent left: {e}"
                    );
                    continue;
                }
            };
            for f in filters {
                if held.get_or_insert_with(held_programs).contains(&f.prog_id) {
                    // A live process's (an `inspect`'s): not this lock's to clean.
                    tracing::info!(
                        interface = %self.interface,
                        prog_id = f.prog_id,
                        "left the {name} filter on the {side_name}: a running process holds \
                         its program"
                    );
                    continue;
                }
                match delete_filter(&f) {
                    Ok(()) => {
                        removed += 1;
                        tracing::warn!(
                            interface = %self.interface,
                            dead_pid = %dead,
                            "removed the {name} filter an agent that did not exit cleanly \
                             left on the {side_name}"
                        );
                    }
                    // Gone meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => tracing::warn!(
                        interface = %self.interface,
                        "could not remove the {name} filter a previous agent left: {e}"
                    ),
                }
            }
        }
        if self.me.clsact {
            match remove_clsact_if_unused(&self.interface) {
                Some(true) => {
                    removed += 1;
                    self.me.clsact = false;
                    self.write();
                }
                // Someone else's filter is on it: removed when that one is gone.
                Some(false) => {}
                None => {
                    self.me.clsact = false;
                    self.write();
                }
            }
        }
        removed
    }

    /// Before attaching: a clsact qdisc not there yet is marked as this agent's in the lock
    /// file. An agent killed after adding it and before [`Self::attached`] then still leaves
    /// its removal to the next one (which finds none, if TCX was used, and lets it be).
    pub fn attaching(&mut self) {
        if !self.me.clsact && has_clsact(&self.interface) == Some(false) {
            self.me.clsact = true;
            self.premarked = true;
            self.write();
        }
    }

    /// After attaching: whether this agent added the clsact qdisc (then it removes it).
    pub fn attached(&mut self, added_clsact: bool) {
        if std::mem::take(&mut self.premarked) {
            self.me.clsact = added_clsact;
        }
        self.me.clsact |= added_clsact;
        self.write();
    }

    /// Rewrites the lock file in one write, then cuts what is left of an older text: an
    /// agent killed at any point leaves its text whole (truncating first could leave the
    /// file empty, and the next agent would not know what to clean up).
    fn write(&mut self) {
        let text = self.me.render();
        let r = self
            .lock
            .write_all_at(text.as_bytes(), 0)
            .and_then(|()| self.lock.set_len(text.len() as u64));
        if let Err(e) = r {
            tracing::warn!(path = %self.path.display(), "writing the instance lock: {e}");
        }
    }
}

/// At exit, after detaching: a qdisc this agent is to remove and still cannot (another filter
/// is on it) stays in the lock file for the next agent; otherwise the file goes, still locked.
impl Drop for Instance {
    fn drop(&mut self) {
        if self.me.clsact && remove_clsact_if_unused(&self.interface) != Some(false) {
            self.me.clsact = false;
        }
        if self.me.clsact {
            self.write();
        } else if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "removing the instance lock: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_round_trips() {
        let h = Holder {
            pid: "42".into(),
            ports: "3306,3307".into(),
            clsact: true,
        };
        assert_eq!(Holder::parse(&h.render()), h);
        assert_eq!(Holder::parse(""), Holder::default());
        // Killed before the cut: a shorter text over a longer one still reads as written.
        let short = Holder {
            pid: "7".into(),
            ports: "3306".into(),
            clsact: false,
        };
        let mut text = h.render().into_bytes();
        text[..short.render().len()].copy_from_slice(short.render().as_bytes());
        assert_eq!(Holder::parse(std::str::from_utf8(&text).unwrap()), short);
    }
}
