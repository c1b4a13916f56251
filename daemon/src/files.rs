//! Files vmsnapd makes next to a VM's disks: created only where nothing is (not even a dangling
//! symlink, which `Path::exists` would miss and `open` would follow), with the permissions of
//! the file they extend or copy, whatever the process umask.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Permission bits copied from a file: read, write and execute for owner, group and others;
/// never setuid, setgid or sticky.
const COPIED_BITS: u32 = 0o777;

/// True when anything is at `path`: a file, a directory, or a symlink, dangling or not.
pub fn path_taken(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Creates `path` as a new, empty regular file with the permission bits of `like`. Fails if
/// anything is at `path` already (`O_EXCL`: a symlink planted there is not followed). On a
/// failure after the file was made, the file is removed again.
pub fn create_new_like(path: &Path, like: &Path) -> io::Result<File> {
    create_new_like_with(path, like, |file, permissions| {
        file.set_permissions(permissions)
    })
}

/// [`create_new_like`], with the step that sets the new file's permissions given (tests make it
/// fail).
fn create_new_like_with(
    path: &Path,
    like: &Path,
    set_permissions: impl FnOnce(&File, Permissions) -> io::Result<()>,
) -> io::Result<File> {
    let mode = fs::metadata(like)?.permissions().mode() & COPIED_BITS;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)?;
    // The umask may have taken bits away; the file gets exactly those of `like`.
    match set_permissions(&file, Permissions::from_mode(mode)) {
        Ok(()) => Ok(file),
        Err(e) => {
            // Ours (O_EXCL, not through a symlink), and not what the caller asked for; removed
            // only while the path still names the very file made (dev, inode).
            let made = file.metadata().map(|m| (m.dev(), m.ino()));
            let there = fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()));
            drop(file);
            if matches!((made, there), (Ok(made), Ok(there)) if made == there) {
                let _ = fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// Why [`create_new_image`] made no overlay, in words that name it: something is at its path
/// already (callers refuse the operation), or the create failed. Each message is whole (says
/// "overlay" and the path once): callers add only which disk.
#[derive(Debug, thiserror::Error)]
pub enum NewFileError {
    #[error("the overlay {path} already exists")]
    Exists { path: String },
    #[error("cannot create the overlay {path}: {source}")]
    Create {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// [`create_new_like`] for a new disk image next to `like`, the image it extends (an overlay),
/// with an error that names `path` as given.
pub fn create_new_image(path: &str, like: &str) -> Result<File, NewFileError> {
    create_new_like(Path::new(path), Path::new(like)).map_err(|source| {
        let path = path.to_string();
        match source.kind() {
            io::ErrorKind::AlreadyExists => NewFileError::Exists { path },
            _ => NewFileError::Create { path, source },
        }
    })
}

/// Copies the regular file `from` to a new file `to` (see [`create_new_like`]).
pub fn copy_file_new(from: &Path, to: &Path) -> io::Result<()> {
    let mut source = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let mut target = create_new_like(to, from)?;
    io::copy(&mut source, &mut target)?;
    target.sync_all()
}

/// Copies the directory tree `from` to a new directory `to`, each file and directory with the
/// permission bits of its original. A symlink in `from` is refused rather than followed.
pub fn copy_dir_new(from: &Path, to: &Path) -> io::Result<()> {
    let mode = fs::symlink_metadata(from)?.permissions().mode() & COPIED_BITS;
    fs::DirBuilder::new().mode(mode).create(to)?;
    fs::set_permissions(to, Permissions::from_mode(mode))?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_dir_new(&entry.path(), &dest)?;
        } else if kind.is_file() {
            copy_file_new(&entry.path(), &dest)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a regular file or directory",
                    entry.path().display()
                ),
            ));
        }
    }
    Ok(())
}

/// Replaces folder `target` with a copy of `from`, so that `target` holds either all it held
/// or the whole copy, never a part of either: the copy is made next to it first (`staged`, a
/// leftover of an earlier attempt removed), the old folder renamed aside (`replaced`), the copy
/// renamed into place, then the old folder removed. A copy that fails leaves `target` as it
/// was. Run again after a crash at any point, it ends the same way.
pub fn replace_dir_with_copy(
    from: &Path,
    target: &Path,
    staged: &Path,
    replaced: &Path,
) -> io::Result<()> {
    remove_leftover(staged)?;
    if let Err(e) = copy_dir_new(from, staged) {
        let _ = remove_leftover(staged);
        return Err(e);
    }
    if path_taken(target) {
        remove_leftover(replaced)?;
        fs::rename(target, replaced)?;
    }
    fs::rename(staged, target)?;
    remove_leftover(replaced)
}

/// Removes what an interrupted copy left at `partial` (a file or a folder), if anything.
pub fn remove_leftover(partial: &Path) -> io::Result<()> {
    match fs::symlink_metadata(partial) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(partial),
        Ok(_) => fs::remove_file(partial),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Bytes still free for an unprivileged writer in the filesystem holding `path` (statvfs
/// `f_bavail`).
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a pointer to memory of statvfs's own type.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn new_files_take_the_mode_of_their_original_whatever_the_umask() {
        let dir = tempfile::tempdir().expect("tempdir");
        for original_mode in [0o600, 0o640, 0o644, 0o660] {
            let disk = dir.path().join(format!("disk-{original_mode:o}"));
            fs::write(&disk, b"data").expect("write");
            fs::set_permissions(&disk, Permissions::from_mode(original_mode)).expect("chmod");
            let overlay = dir.path().join(format!("overlay-{original_mode:o}"));
            create_new_like(&overlay, &disk).expect("created");
            assert_eq!(mode(&overlay), original_mode);
            let copy = dir.path().join(format!("copy-{original_mode:o}"));
            copy_file_new(&disk, &copy).expect("copied");
            assert_eq!(mode(&copy), original_mode);
            assert_eq!(fs::read(&copy).expect("read"), b"data");
        }
    }

    #[test]
    fn a_failure_after_the_create_removes_the_new_file_and_only_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk");
        fs::write(&disk, b"data").expect("write");
        let overlay = dir.path().join("overlay");
        let refused = |_: &File, _: Permissions| Err(io::Error::from_raw_os_error(libc::EPERM));
        let error = create_new_like_with(&overlay, &disk, refused).expect_err("refused");
        assert_eq!(error.raw_os_error(), Some(libc::EPERM), "the cause is kept");
        assert!(!path_taken(&overlay), "the file made for it is gone");
        // A file that was there already is not ours: the create fails before any removal.
        fs::write(&overlay, b"precious").expect("write");
        let error = create_new_like_with(&overlay, &disk, refused).expect_err("exists");
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&overlay).expect("read"), b"precious");
        // Someone else's file renamed over the new one before the failure is not removed.
        let other = dir.path().join("other-overlay");
        let theirs = dir.path().join("theirs");
        fs::write(&theirs, b"someone else's").expect("write");
        let replaced = |_: &File, _: Permissions| {
            fs::rename(&theirs, &other)?;
            Err(io::Error::from_raw_os_error(libc::EPERM))
        };
        create_new_like_with(&other, &disk, replaced).expect_err("refused");
        assert_eq!(fs::read(&other).expect("read"), b"someone else's");
    }

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk");
        fs::write(&disk, b"data").expect("write");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").expect("write");
        let dangling_target = dir.path().join("not-there");
        for (link, target) in [("to-victim", &victim), ("dangling", &dangling_target)] {
            let link = dir.path().join(link);
            symlink(target, &link).expect("symlink");
            assert!(path_taken(&link), "a symlink is taken, even dangling");
            assert!(create_new_like(&link, &disk).is_err());
            assert!(copy_file_new(&disk, &link).is_err());
        }
        assert_eq!(fs::read(&victim).expect("read"), b"precious");
        assert!(
            !dangling_target.exists(),
            "nothing was created through the link"
        );
        // Reading through a symlink is refused too: a copy's source must be the file itself.
        assert!(copy_file_new(&dir.path().join("to-victim"), &dir.path().join("c")).is_err());
    }

    #[test]
    fn available_bytes_reads_the_filesystem_and_fails_on_a_missing_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(available_bytes(dir.path()).is_ok());
        assert!(available_bytes(&dir.path().join("not-there")).is_err());
    }

    #[test]
    fn directory_copies_keep_modes_and_refuse_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let from = dir.path().join("tpm");
        fs::create_dir(&from).expect("mkdir");
        fs::set_permissions(&from, Permissions::from_mode(0o700)).expect("chmod");
        fs::create_dir(from.join("tpm2")).expect("mkdir");
        fs::write(from.join("tpm2/state"), b"s").expect("write");
        fs::set_permissions(from.join("tpm2/state"), Permissions::from_mode(0o600)).expect("chmod");
        let to = dir.path().join("copy");
        copy_dir_new(&from, &to).expect("copied");
        assert_eq!(mode(&to), 0o700);
        assert_eq!(mode(&to.join("tpm2/state")), 0o600);
        assert_eq!(fs::read(to.join("tpm2/state")).expect("read"), b"s");
        assert!(copy_dir_new(&from, &to).is_err(), "the target must be new");
        symlink("/etc/passwd", from.join("tpm2/link")).expect("symlink");
        assert!(copy_dir_new(&from, &dir.path().join("copy2")).is_err());
    }

    /// A folder with one file `name` holding `content`.
    fn folder_with(dir: &Path, folder: &str, name: &str, content: &[u8]) -> std::path::PathBuf {
        let path = dir.join(folder);
        fs::create_dir_all(path.join("sub")).expect("mkdir");
        fs::write(path.join("sub").join(name), content).expect("write");
        path
    }

    #[test]
    fn a_folder_replaced_with_a_copy_holds_the_whole_copy_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = folder_with(dir.path(), "copy", "state", b"snapshot's");
        let target = folder_with(dir.path(), "target", "old-only", b"before");
        let (staged, replaced) = (dir.path().join("staged"), dir.path().join("replaced"));
        // A leftover of an attempt cut short.
        folder_with(dir.path(), "staged", "partial", b"half");
        replace_dir_with_copy(&copy, &target, &staged, &replaced).expect("replaced");
        assert_eq!(
            fs::read(target.join("sub/state")).expect("copied"),
            b"snapshot's"
        );
        assert!(!path_taken(&target.join("sub/old-only")));
        assert!(!path_taken(&target.join("sub/partial")));
        assert!(!path_taken(&staged) && !path_taken(&replaced));
        // Where nothing was, the copy is put in place too.
        fs::remove_dir_all(&target).expect("rm");
        replace_dir_with_copy(&copy, &target, &staged, &replaced).expect("put");
        assert!(path_taken(&target.join("sub/state")));
    }

    #[test]
    fn a_copy_that_fails_leaves_the_folder_it_would_replace_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = folder_with(dir.path(), "copy", "state", b"snapshot's");
        // Only regular files and folders are copied: a symlink in the copy stops it midway.
        symlink("/etc/passwd", copy.join("sub/zz-link")).expect("symlink");
        let target = folder_with(dir.path(), "target", "state", b"before");
        let (staged, replaced) = (dir.path().join("staged"), dir.path().join("replaced"));
        assert!(replace_dir_with_copy(&copy, &target, &staged, &replaced).is_err());
        assert_eq!(fs::read(target.join("sub/state")).expect("kept"), b"before");
        assert!(!path_taken(&staged) && !path_taken(&replaced));
    }

    #[test]
    fn a_replacement_cut_short_between_its_renames_ends_with_the_copy_when_run_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = folder_with(dir.path(), "copy", "state", b"snapshot's");
        let (staged, replaced) = (dir.path().join("staged"), dir.path().join("replaced"));
        let target = dir.path().join("target");
        // The old folder renamed aside, the crash before the copy went into place.
        folder_with(dir.path(), "replaced", "state", b"before");
        folder_with(dir.path(), "staged", "state", b"snapshot's");
        replace_dir_with_copy(&copy, &target, &staged, &replaced).expect("finished");
        assert_eq!(
            fs::read(target.join("sub/state")).expect("copied"),
            b"snapshot's"
        );
        assert!(!path_taken(&staged) && !path_taken(&replaced));
        // Cut short after the copy went into place, before the old folder was removed.
        folder_with(dir.path(), "replaced", "state", b"before");
        replace_dir_with_copy(&copy, &target, &staged, &replaced).expect("finished");
        assert_eq!(
            fs::read(target.join("sub/state")).expect("copied"),
            b"snapshot's"
        );
        assert!(!path_taken(&staged) && !path_taken(&replaced));
    }
}
