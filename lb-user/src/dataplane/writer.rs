//! One writer of the pinned XDP maps at a time. Two `lb run` processes can share a pin
//! directory for a while (an upgrade hand-over, or two overlapping pods of a DaemonSet on one
//! node during a rolling update); both writing would interleave two views of the backends
//! (health verdicts, admin changes) in one Maglev table. The writer holds an exclusive
//! flock(2) on the pin directory: the lock lives on the shared bpffs, so it also holds across
//! containers whose /run differs, and the kernel drops it when the holder dies, even by
//! SIGKILL, so a crash never leaves the maps without a possible writer.
use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

/// The exclusive right to write the maps pinned under one directory; released on drop.
#[derive(Debug)]
pub struct WriterLock {
    /// Open only for the lock it carries; closing it releases the lock.
    _dir: File,
    path: PathBuf,
}

impl WriterLock {
    /// Takes the lock on `pin` (created if missing), or None when another process holds it.
    pub fn try_take(pin: &Path) -> io::Result<Option<Self>> {
        std::fs::create_dir_all(pin)?;
        let dir = File::open(pin)?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(Self { _dir: dir, path: pin.to_path_buf() }));
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            e => Err(e),
        }
    }

    /// Waits until the holder releases `pin` (it stops, or hands over), polling: a blocking
    /// flock would tie up a thread that cannot be cancelled.
    pub async fn wait(pin: &Path) -> io::Result<Self> {
        loop {
            if let Some(lock) = Self::try_take(pin)? {
                return Ok(lock);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pin directory this lock is on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid holding the writer lock on `pin`, as /proc/locks tells it (0 when the holder is
/// in a pid namespace this process cannot see); None when nobody holds it or it cannot be read.
pub fn holder(pin: &Path) -> Option<u32> {
    let meta = std::fs::metadata(pin).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// The pid of the FLOCK line of /proc/locks on inode `ino` of device `dev`.
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF": major:minor in hex, inode decimal.
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_at_a_time_and_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("lb-writer-{}", std::process::id()));
        let first = WriterLock::try_take(&dir).unwrap().expect("free");
        // flock conflicts between open file descriptions, even in one process.
        assert!(WriterLock::try_take(&dir).unwrap().is_none(), "held");
        assert_eq!(holder(&dir), Some(std::process::id()));
        drop(first);
        assert!(WriterLock::try_take(&dir).unwrap().is_some(), "released");
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn holder_reads_the_flock_line_of_the_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:1f:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4321 00:1f:99 0 EOF\n";
        assert_eq!(holder_in(locks, libc::makedev(0, 0x1f), 99), Some(4321));
        assert_eq!(holder_in(locks, libc::makedev(0, 0x1f), 98), None);
    }
}
