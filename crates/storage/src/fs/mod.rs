//! The file system under the WAL and the file snapshot store.
//!
//! Everything durable in raftwork goes through [`FileSystem`] and
//! [`FsFile`], in the spirit of raft-engine's `FileSystem` trait. Two
//! implementations:
//! * [`RealFs`]: the operating system's (std, plus `flock`, `fallocate` and
//!   `renameat2(RENAME_EXCHANGE)` through rustix);
//! * [`SimFs`]: an in-memory disk for the deterministic simulator that keeps
//!   what was written apart from what was synced. At a simulated power cut
//!   it keeps any subset of the pages written since their file's last sync,
//!   may tear one write at any byte, and keeps only a prefix of the
//!   namespace changes (create, rename, remove) made since the last
//!   directory sync. It can also fail a chosen call with EIO or ENOSPC.
//!
//! The contract the code above relies on is the POSIX one, no more: data is
//! durable after `sync_data`/`sync_all` of its file; a name (create, rename,
//! remove) is durable after `sync_dir` of its directory.

mod sim;

use std::any::Any;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use sim::{SimFs, SimFsFault, SimFsStats};

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write a new file; fails if the name exists.
    CreateNew,
    /// Read and write, creating the file or emptying an existing one.
    CreateTruncate,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name within its directory.
    pub name: String,
    /// Whether it is a directory.
    pub is_dir: bool,
}

/// An open file: positional reads and writes, no cursor.
pub trait FsFile: Send + Sync + fmt::Debug {
    /// Reads at `offset`; returns the bytes read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset` (page cache only until a sync).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Makes the file at least `len` bytes long, reserving the space if the
    /// file system can (`fallocate`), else extending it sparse.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Makes the data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the data and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.read_at(&mut buf[got..], offset + got as u64)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file ends before the bytes asked for",
                    ))
                }
                n => got += n,
            }
        }
        Ok(())
    }

    /// Reads the whole file into `buf` (appending).
    fn read_to_end(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let len = self.len()? as usize;
        let start = buf.len();
        buf.resize(start + len, 0);
        let mut got = 0;
        while got < len {
            match self.read_at(&mut buf[start + got..], got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(start + got);
        Ok(())
    }
}

/// A file system: names, directories and locks.
pub trait FileSystem: Send + Sync + fmt::Debug + 'static {
    /// Opens `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>>;
    /// Creates a directory; fails if it exists.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Creates a directory and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The entries of a directory, in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;
    /// Whether anything exists at `path` (symlinks are not followed).
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Whether `path` is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Renames a file or directory, replacing a file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Swaps two names atomically. `ErrorKind::Unsupported` where the file
    /// system cannot; callers then fall back to two renames.
    fn exchange(&self, a: &Path, b: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the names in directory `path` durable (fsync of the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive lock named by `path` (created if missing), held
    /// until the returned guard is dropped; `ErrorKind::WouldBlock` if
    /// another holder has it.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;
}

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl RealFs {
    /// A shared handle, as the stores take it.
    pub fn shared() -> Arc<dyn FileSystem> {
        Arc::new(RealFs)
    }
}

#[derive(Debug)]
struct RealFile(File);

impl FsFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(&self.0, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        // Preallocated, appends do not change the size (fdatasync then has
        // no size to journal). Some file systems cannot; sparse will do.
        if rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len).is_err() {
            self.0.set_len(len.max(self.len()?))?;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl FileSystem for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>> {
        let mut o = OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::CreateNew => o.read(true).write(true).create_new(true),
            OpenMode::CreateTruncate => o.read(true).write(true).create(true).truncate(true),
        };
        Ok(Arc::new(RealFile(o.open(path)?)))
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for item in std::fs::read_dir(path)? {
            let item = item?;
            out.push(DirEntry {
                name: item.file_name().to_string_lossy().into_owned(),
                is_dir: item.file_type()?.is_dir(),
            });
        }
        Ok(out)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn exchange(&self, a: &Path, b: &Path) -> io::Result<()> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use rustix::fs::{renameat_with, RenameFlags, CWD};
            use rustix::io::Errno;
            match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
                Ok(()) => Ok(()),
                Err(e) if e == Errno::INVAL || e == Errno::NOSYS || e == Errno::NOTSUP => Err(
                    io::Error::new(io::ErrorKind::Unsupported, "no RENAME_EXCHANGE here"),
                ),
                Err(e) => Err(e.into()),
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = (a, b);
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no atomic exchange here",
            ))
        }
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("locked by another process ({e})"),
                )
            },
        )?;
        Ok(Box::new(file))
    }
}

/// Sequential reads and writes over an [`FsFile`] (for streams: snapshot
/// data and meta files).
#[derive(Debug)]
pub struct FileCursor {
    file: Arc<dyn FsFile>,
    pos: u64,
}

impl FileCursor {
    /// A cursor at the start of `file`.
    pub fn new(file: Arc<dyn FsFile>) -> Self {
        Self { file, pos: 0 }
    }

    /// The file under the cursor.
    pub fn file(&self) -> &Arc<dyn FsFile> {
        &self.file
    }
}

impl io::Read for FileCursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Write for FileCursor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The parent of `path` for syncing its entry ("." for a bare name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
