//! The image index's change feed: inotify tells the header cache which images changed, so a
//! scan takes an unchanged image's header from memory with no `stat` (issue 13: about 1,000
//! `stat`s per scan at 500 domains).
//!
//! One inotify descriptor, non-blocking, with no thread of its own: the cache drains it before
//! it trusts any entry. The kernel queues an event in the very syscall that changes a file, so
//! a change completed before the drain is seen; one after it is the race a `stat` has too.
//!
//! An entry is trusted only when the kernel sees every change that could alter what its path
//! names: the file is watched (content, attributes, deleted, moved), its folder is watched (a
//! name created, moved or deleted there), every folder above it is watched (moved or deleted),
//! all of them on a local filesystem of [`is_local_fs`]'s list (inotify cannot see what another
//! host writes on a shared one), with no symbolic link on the way, and the mount table has not
//! changed (a mount over a folder changes what a path names with no inotify event). Anything
//! else is validated by `stat` as before. A lost event (queue overflow) or a failed read drops
//! everything watched.
//!
//! Writes through Linux native AIO (`io_submit`, QEMU's `aio=native`) may raise no inotify
//! event on some kernels (6.18 here does raise IN_MODIFY: `qemu-io -t none -i native`). QEMU
//! itself rewrites a header only to shorten a chain (a block commit or stream names a lower
//! image); a stale entry then names images that are no longer in the chain, which only counts
//! them as used. The chains an operation decides on are read with `chain::checked_reader`,
//! which trusts no entry to this feed alone. Every other writer (qemu-img, an editor, `cp`,
//! `mv`, `truncate`) goes through a notifying syscall.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use rustc_hash::FxHashMap;
use tracing::debug;

/// What a file's watch reports: its content or attributes changed, it was written and closed,
/// deleted or moved. One-shot: an image a running VM writes costs one event until it is read
/// again, not one per write.
const FILE_MASK: u32 = libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONESHOT;
/// An image's folder: a name made, replaced or removed there (`mv new.qcow2 top.qcow2`).
const CHILD_MASK: u32 = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_DELETE | libc::IN_MOVED_FROM;
/// Every folder on the way: moved or removed, so the path leads somewhere else.
const SELF_MASK: u32 = libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;

/// Local filesystems, where every change goes through this kernel (`statfs`'s `f_type`, from
/// linux/magic.h). An allow-list: NFS, CIFS, Ceph, GlusterFS, FUSE, overlayfs (its lower
/// layers change unseen) and anything unknown keep the `stat` check.
pub(crate) fn is_local_fs(f_type: u32) -> bool {
    const EXT2_3_4: u32 = 0xEF53;
    const XFS: u32 = 0x5846_5342;
    const BTRFS: u32 = 0x9123_683E;
    const TMPFS: u32 = 0x0102_1994;
    const F2FS: u32 = 0xF2F5_2010;
    matches!(f_type, EXT2_3_4 | XFS | BTRFS | TMPFS | F2FS)
}

/// The filesystem type of `path`, or `None` when it cannot be told.
fn fs_type(path: &str) -> Option<u32> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: `c` is a NUL-terminated path; `st` points to a `statfs` the call fills.
    statfs_type(|st| unsafe { libc::statfs(c.as_ptr(), st) })
}

/// The filesystem type of the open file `file`.
fn file_fs_type(file: &File) -> Option<u32> {
    // SAFETY: `file` is an open descriptor; `st` points to a `statfs` the call fills.
    statfs_type(|st| unsafe { libc::fstatfs(file.as_raw_fd(), st) })
}

/// `f_type` from `call` (statfs or fstatfs into the pointer it is given), `None` if it failed.
fn statfs_type(call: impl FnOnce(*mut libc::statfs) -> libc::c_int) -> Option<u32> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    if call(st.as_mut_ptr()) != 0 {
        return None;
    }
    // SAFETY: the call succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // c_long on 64-bit Linux, int on 32-bit: the magic numbers are 32-bit.
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_type as u32)
}

/// What a drain found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// These paths may have changed (possibly none); `names` are those of them a folder's
    /// watch reported: a name made, replaced or removed there.
    Changed {
        paths: Vec<String>,
        names: Vec<String>,
    },
    /// Anything may have changed: an event was lost, the queue could not be read, a watched
    /// folder moved, or the mount table changed.
    Everything,
}

/// A watched folder.
struct Dir {
    /// The folder's path, with no trailing `/` (but `/` itself).
    path: String,
    /// Names created, moved or removed in it are reported.
    children: bool,
}

/// The inotify descriptor and what each of its watches is for.
pub(crate) struct Index {
    fd: OwnedFd,
    /// Which filesystem types are local: [`is_local_fs`] (tests fake others).
    is_local: fn(u32) -> bool,
    /// The mount table: polled before a drain trusts anything (a change wakes it with POLLPRI).
    mounts: Option<File>,
    /// File watch -> the paths cached under it (one inode can have several names).
    files: FxHashMap<i32, Vec<String>>,
    /// Path -> its file watch.
    file_of: FxHashMap<String, i32>,
    /// Folder watch -> the folder.
    dirs: FxHashMap<i32, Dir>,
    /// Folder path -> its watch, or `None` when it cannot be watched (not local, a symbolic
    /// link on the way, a watch refused): asked once per folder.
    dir_of: FxHashMap<String, Option<i32>>,
}

impl Index {
    /// A new index, or `None` when inotify is not available (then everything is `stat`ed).
    pub(crate) fn new(is_local: fn(u32) -> bool) -> Option<Index> {
        // SAFETY: plain syscall; the descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            debug!(error = %std::io::Error::last_os_error(), "no inotify: image headers are checked by stat");
            return None;
        }
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Some(Index {
            fd,
            is_local,
            // Without it a mount change could go unseen: nothing is trusted then (see `trusts`).
            mounts: File::open("/proc/self/mountinfo").ok(),
            files: FxHashMap::default(),
            file_of: FxHashMap::default(),
            dirs: FxHashMap::default(),
            dir_of: FxHashMap::default(),
        })
    }

    /// Whether entries may be trusted at all.
    pub(crate) fn trusts(&self) -> bool {
        self.mounts.is_some()
    }

    /// Reads every event queued so far. On [`Drained::Everything`] every watch is gone (the
    /// descriptor is made anew) and the caller drops every entry.
    pub(crate) fn drain(&mut self) -> Drained {
        let drained = self.read_events();
        if drained == Drained::Everything {
            self.reset();
        }
        drained
    }

    fn read_events(&mut self) -> Drained {
        if self.mounts_changed() {
            debug!("the mount table changed: every cached image header is dropped");
            return Drained::Everything;
        }
        let mut changed = Vec::new();
        let mut names = Vec::new();
        // Aligned for `inotify_event`; large enough for many events per read.
        let mut buf = vec![0u64; 8192];
        loop {
            // SAFETY: reads into `buf`, bounded by its length in bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len() * std::mem::size_of::<u64>(),
                )
            };
            if n < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::WouldBlock {
                    return Drained::Changed {
                        paths: changed,
                        names,
                    };
                }
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                debug!(%error, "cannot read inotify events: every cached image header is dropped");
                return Drained::Everything;
            }
            let Ok(n) = usize::try_from(n) else {
                return Drained::Everything;
            };
            if n == 0 {
                return Drained::Everything;
            }
            // SAFETY: `buf` holds `n` initialised bytes; viewed as bytes only.
            let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
            if !self.take_events(bytes, &mut changed, &mut names) {
                return Drained::Everything;
            }
        }
    }

    /// Decodes the events in `bytes` (what one read returned) into the paths they name, and
    /// among them the names a folder's watch reported; `false` when anything may have changed.
    fn take_events(
        &mut self,
        bytes: &[u8],
        changed: &mut Vec<String>,
        names: &mut Vec<String>,
    ) -> bool {
        const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
        let mut at = 0;
        while at + HEAD <= bytes.len() {
            let field = |offset: usize| {
                let b = &bytes[at + offset..at + offset + 4];
                [b[0], b[1], b[2], b[3]]
            };
            let wd = i32::from_ne_bytes(field(0));
            let mask = u32::from_ne_bytes(field(4));
            let len = u32::from_ne_bytes(field(12)) as usize;
            let Some(name) = bytes.get(at + HEAD..at + HEAD + len) else {
                return false;
            };
            at += HEAD + len;
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if mask & libc::IN_Q_OVERFLOW != 0 {
                debug!("inotify queue overflow: every cached image header is dropped");
                return false;
            }
            if let Some(paths) = self.files.remove(&wd) {
                // One-shot: the watch is gone after this event (IN_IGNORED follows).
                for path in &paths {
                    self.file_of.remove(path);
                }
                changed.extend(paths);
                continue;
            }
            let Some(dir) = self.dirs.get(&wd) else {
                // A file watch already handled (its IN_IGNORED), or one unwatched since.
                continue;
            };
            if mask
                & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED | libc::IN_UNMOUNT)
                != 0
            {
                debug!(folder = %dir.path, "a watched folder moved or went: every cached image header is dropped");
                return false;
            }
            let Ok(name) = std::str::from_utf8(name) else {
                // Not a name any cached (UTF-8) path holds.
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let path = if dir.path == "/" {
                format!("/{name}")
            } else {
                format!("{}/{name}", dir.path)
            };
            if self.dir_of.contains_key(&path) {
                // A folder on the way to cached images was replaced.
                return false;
            }
            if dir.children {
                names.push(path.clone());
            }
            changed.push(path);
        }
        true
    }

    fn mounts_changed(&self) -> bool {
        let Some(mounts) = &self.mounts else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd: mounts.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc != 0 && (rc < 0 || pfd.revents & (libc::POLLPRI | libc::POLLERR) != 0)
    }

    /// Drops every watch: a new descriptor (closing the old one removes its watches).
    pub(crate) fn reset(&mut self) {
        if let Some(fresh) = Index::new(self.is_local) {
            *self = fresh;
        } else {
            self.files.clear();
            self.file_of.clear();
            self.dirs.clear();
            self.dir_of.clear();
            self.mounts = None;
        }
    }

    /// Watches `path` (an absolute path to a regular file) before it is read, with every
    /// folder on its way; `false` when the kernel would not see every change to what it
    /// names, and then the entry must be checked by `stat`.
    pub(crate) fn watch(&mut self, path: &str) -> bool {
        if !self.trusts() || !path.starts_with('/') {
            return false;
        }
        let Some(slash) = path.rfind('/') else {
            return false;
        };
        let folder = if slash == 0 { "/" } else { &path[..slash] };
        let name = &path[slash + 1..];
        if name.is_empty() || name == "." || name == ".." || !self.watch_dir(folder, true) {
            return false;
        }
        // The last component must not be a symbolic link: the watch would follow it, the
        // folder watch would not see the target's name change.
        if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file()) {
            return false;
        }
        let Some(wd) = self.add_watch(path, FILE_MASK) else {
            return false;
        };
        match self.file_of.insert(path.to_string(), wd) {
            Some(old) if old != wd => self.drop_path_from(old, path),
            Some(_) => return true,
            None => {}
        }
        self.files.entry(wd).or_default().push(path.to_string());
        true
    }

    /// Whether the open file `file` is on a local filesystem (a file can be a mount point of
    /// its own, on another filesystem than its folder).
    pub(crate) fn is_local_file(&self, file: &File) -> bool {
        file_fs_type(file).is_some_and(self.is_local)
    }

    /// Stops trusting `path`'s watch (the file read was not the one watched, or is not on a
    /// local filesystem).
    pub(crate) fn unwatch(&mut self, path: &str) {
        if let Some(wd) = self.file_of.remove(path) {
            self.drop_path_from(wd, path);
        }
    }

    fn drop_path_from(&mut self, wd: i32, path: &str) {
        let Some(paths) = self.files.get_mut(&wd) else {
            return;
        };
        paths.retain(|p| p != path);
        if paths.is_empty() {
            self.files.remove(&wd);
            // SAFETY: plain syscall on our descriptor; a watch already gone is EINVAL.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
    }

    /// Watches `folder` and every folder above it; `children`: names made or removed in it
    /// too. `false` when any of them cannot be watched.
    /// Watches the names in `folder` (an absolute path) before it is listed, with every folder
    /// on its way; `false` when the kernel would not see every name made, replaced or removed
    /// there, and then a listing must be read again each time.
    pub(crate) fn watch_folder(&mut self, folder: &str) -> bool {
        self.trusts() && folder.starts_with('/') && self.watch_dir(folder, true)
    }

    fn watch_dir(&mut self, folder: &str, children: bool) -> bool {
        if let Some(known) = self.dir_of.get(folder) {
            let Some(wd) = *known else {
                return false;
            };
            if !children || self.dirs.get(&wd).is_some_and(|d| d.children) {
                return true;
            }
        }
        let watched = self.watch_dir_now(folder, children);
        self.dir_of.insert(folder.to_string(), watched);
        watched.is_some()
    }

    fn watch_dir_now(&mut self, folder: &str, children: bool) -> Option<i32> {
        // The folder above first: once this one is watched, a move of any of them is seen.
        if folder != "/" {
            let slash = folder.rfind('/')?;
            let above = if slash == 0 { "/" } else { &folder[..slash] };
            if !self.watch_dir(above, false) {
                return None;
            }
        }
        // No symbolic link, `.`, `..` or doubled `/` on the way: the path is the folder's one
        // name, so the watches above cover it.
        if std::fs::symlink_metadata(folder).map_or(true, |m| !m.file_type().is_dir()) {
            return None;
        }
        if folder != "/"
            && folder
                .split('/')
                .skip(1)
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return None;
        }
        if !fs_type(folder).is_some_and(self.is_local) {
            return None;
        }
        let mask = SELF_MASK | if children { CHILD_MASK } else { 0 } | libc::IN_ONLYDIR;
        // Added to what the folder already reports: it can be both an image's folder and on
        // the way to another's.
        let wd = self.add_watch(folder, mask | libc::IN_MASK_ADD)?;
        let dir = self.dirs.entry(wd).or_insert_with(|| Dir {
            path: folder.to_string(),
            children,
        });
        dir.children |= children;
        Some(wd)
    }

    fn add_watch(&self, path: &str, mask: u32) -> Option<i32> {
        let c = std::ffi::CString::new(path).ok()?;
        // SAFETY: `c` is a NUL-terminated path; the descriptor is ours.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            // ENOSPC (max_user_watches) and the like: this file keeps the `stat` check.
            debug!(%path, error = %std::io::Error::last_os_error(), "cannot watch");
            return None;
        }
        Some(wd)
    }

    /// Tests: `file` stands in for /proc/self/mountinfo, whose poll a test cannot make signal
    /// without mounting something (root, a mount namespace); the next drain polls it.
    #[cfg(test)]
    pub(crate) fn poll_mounts_of(&mut self, file: File) {
        self.mounts = Some(file);
    }

    /// Tests: decodes `bytes` as if read from the queue.
    #[cfg(test)]
    pub(crate) fn take(&mut self, bytes: &[u8]) -> Drained {
        let (mut paths, mut names) = (Vec::new(), Vec::new());
        if self.take_events(bytes, &mut paths, &mut names) {
            Drained::Changed { paths, names }
        } else {
            Drained::Everything
        }
    }
}
