//! The lock vmsnapd holds on a VM while an operation runs on it: an exclusive `flock` on
//! `<vm_lock_dir>/<VM UUID>.lock`, whose one line says what runs. The libvirt hook
//! (`/etc/libvirt/hooks/qemu.d/vmsnap`) refuses to start a VM whose lock is held, with that
//! line; a second vmsnapd (on another state folder) is refused the VM as Busy. The kernel drops
//! the lock when the holder dies, so a crash never leaves a VM that cannot start. The file is
//! on tmpfs (/run) and taken without waiting, so taking it costs microseconds.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

/// How many times a conflicting lock is tried (2 ms apart) before it counts as held: the
/// hook's glance lasts well under a millisecond.
const HOOK_GLANCES: u32 = 10;

/// Where the VM locks live.
#[derive(Debug, Clone)]
pub struct VmLocks {
    pub dir: PathBuf,
}

/// A held VM lock; dropping it releases it.
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

/// Why a VM lock was not taken.
#[derive(Debug)]
pub enum VmLockRefused {
    /// Another process holds it; what its file says.
    Held(String),
    /// The lock folder or file cannot be used (the operation may go on without the lock).
    Unusable(String),
}

impl VmLocks {
    /// Takes the lock of VM `vm_uuid`, saying `what` runs.
    pub fn take(&self, vm_uuid: &str, what: &str) -> Result<VmLock, VmLockRefused> {
        let safe = !vm_uuid.is_empty()
            && vm_uuid.len() <= 64
            && vm_uuid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !safe {
            return Err(VmLockRefused::Unusable(format!(
                "\"{}\" is not a UUID",
                vmsnap_api::excerpt(vm_uuid)
            )));
        }
        let unusable = |e: std::io::Error| VmLockRefused::Unusable(e.to_string());
        // World-readable: libvirtd's hook reads the file (as root, but perhaps confined).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(unusable)?;
        let path = self.dir.join(format!("{vm_uuid}.lock"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(unusable)?;
        // The libvirt hook takes a shared lock for a moment to test the file: a conflict is
        // only a holder when it lasts.
        let mut attempts = 0;
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is shared.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked == 0 {
                break;
            }
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(unusable(error));
            }
            attempts += 1;
            if attempts < HOOK_GLANCES {
                std::thread::sleep(std::time::Duration::from_millis(2));
                continue;
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let line = holder.lines().next().unwrap_or("an operation runs");
            return Err(VmLockRefused::Held(vmsnap_api::excerpt(line)));
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", vmsnap_api::terminal_safe(what)))
            .map_err(unusable)?;
        Ok(VmLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";

    #[test]
    fn a_held_lock_refuses_a_second_holder_and_says_what_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = VmLocks {
            dir: dir.path().join("vms"),
        };
        let held = locks
            .take(VM, "snapshot 'a' is being created")
            .expect("taken");
        let text = std::fs::read_to_string(dir.path().join(format!("vms/{VM}.lock")));
        assert_eq!(text.expect("file"), "snapshot 'a' is being created\n");
        match locks.take(VM, "another") {
            Err(VmLockRefused::Held(what)) => assert_eq!(what, "snapshot 'a' is being created"),
            other => panic!("{other:?}"),
        }
        drop(held);
        let again = locks.take(VM, "restore").expect("free again");
        drop(again);
        let text = std::fs::read_to_string(dir.path().join(format!("vms/{VM}.lock")));
        assert_eq!(text.expect("file"), "restore\n");
    }

    #[test]
    fn a_hostile_uuid_never_becomes_a_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = VmLocks {
            dir: dir.path().to_path_buf(),
        };
        for bad in ["../x", "", "a/b", "x\n"] {
            assert!(matches!(
                locks.take(bad, "x"),
                Err(VmLockRefused::Unusable(_))
            ));
        }
    }
}
