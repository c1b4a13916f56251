//! The few qemu-img operations offline work needs, run without a shell.

use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::warn;
use vmsnap_exec::RunError;

/// Why a qemu-img operation failed. What qemu-img printed goes to the journal only: it can
/// name other files of the host, and these messages end up in properties every user can read.
#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("cannot run qemu-img: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-img {command} of {image} did not finish within {seconds}s and was stopped")]
    TimedOut {
        command: String,
        image: String,
        seconds: u64,
    },
    #[error(
        "qemu-img {command} of {image} failed ({status}; its messages are in vmsnapd's journal)"
    )]
    Failed {
        command: String,
        image: String,
        status: String,
    },
    /// The one cause of a failure worth naming: the user can act on it (free space, then try
    /// again), and the words name no file.
    #[error(
        "qemu-img {command} of {image} failed: no space left on device (free some space where \
         the VM's images are, then try again)"
    )]
    NoSpace { command: String, image: String },
    #[error("unreadable qemu-img output: {0}")]
    Output(#[source] serde_json::Error),
    #[error("{image} is missing")]
    Missing { image: String },
    #[error("{image} is in use by another process (it holds the image's write lock)")]
    InUse { image: String },
    #[error("{image} cannot be opened (qemu-img's messages are in vmsnapd's journal)")]
    Unreadable { image: String },
    /// Something is at the overlay's path already, or the file could not be made.
    #[error(transparent)]
    NewFile(#[from] crate::files::NewFileError),
}

/// An image that is missing or held by another process refuses the operation; anything else is
/// a storage failure.
impl From<QemuImgError> for crate::ops::OpError {
    fn from(e: QemuImgError) -> Self {
        match e {
            QemuImgError::Missing { .. }
            | QemuImgError::InUse { .. }
            | QemuImgError::NewFile(crate::files::NewFileError::Exists { .. }) => {
                crate::ops::OpError::Refused(e.to_string())
            }
            _ => crate::ops::OpError::Storage(e.to_string()),
        }
    }
}

/// One image of a backing chain, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainImage {
    pub path: String,
    pub format: String,
}

#[derive(Deserialize)]
struct ImageInfo {
    filename: String,
    format: String,
    #[serde(rename = "virtual-size")]
    _virtual_size: Option<u64>,
}

/// How long the quick qemu-img commands (info, create, rebase -u) may take: they touch metadata
/// only, so even a deep chain on a slow disk answers in seconds; one that does not is hung.
const QUICK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs qemu-img on `image` (one of `args`), killing it at `timeout`. A failure names the command
/// and the image; what qemu-img printed goes to the journal only, since it can name other files
/// of the host and the error ends up in properties every user can read.
fn run(image: &str, args: &[&str], timeout: Duration) -> Result<String, QemuImgError> {
    let command = args.first().copied().unwrap_or_default();
    let mut qemu_img = Command::new("qemu-img");
    qemu_img.args(args);
    let output = match vmsnap_exec::run_bounded(&mut qemu_img, timeout) {
        Ok(output) => output,
        Err(RunError::Spawn(e)) => return Err(QemuImgError::Spawn(e)),
        Err(RunError::TimedOut) => {
            return Err(QemuImgError::TimedOut {
                command: command.to_string(),
                image: image.to_string(),
                seconds: timeout.as_secs(),
            })
        }
    };
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    warn!(image, command, stderr = %stderr.trim(), "qemu-img failed");
    // qemu-img says so only in words ("Block job failed: No space left on device").
    if stderr.contains("No space left on device") {
        return Err(QemuImgError::NoSpace {
            command: command.to_string(),
            image: image.to_string(),
        });
    }
    let status = match output.status.code() {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    };
    Err(QemuImgError::Failed {
        command: command.to_string(),
        image: image.to_string(),
        status,
    })
}

/// The backing chain of `top`, top first. `-U` so that it also works on images a running QEMU
/// holds open; the chain metadata does not change under it while vmsnap holds the VM's lock.
pub fn backing_chain(top: &str) -> Result<Vec<ChainImage>, QemuImgError> {
    let text = run(
        top,
        &["info", "-U", "--backing-chain", "--output", "json", top],
        QUICK_TIMEOUT,
    )?;
    parse_chain(&text)
}

/// `qemu-img info --backing-chain --output json`'s answer, top first.
pub(crate) fn parse_chain(text: &str) -> Result<Vec<ChainImage>, QemuImgError> {
    let infos: Vec<ImageInfo> = serde_json::from_str(text).map_err(QemuImgError::Output)?;
    Ok(infos
        .into_iter()
        .map(|i| ChainImage {
            path: i.filename,
            format: i.format,
        })
        .collect())
}

/// Checks an image a shut-off VM's operation is about to build on: it must be there, and no other
/// process may hold it open for writing (QEMU's image locks, which `qemu-img info` without `-U`
/// respects): a snapshot of an image something else still writes would not stay what it
/// captured. Not for a running VM's images, which its own QEMU holds.
pub fn check_not_in_use(image: &str) -> Result<(), QemuImgError> {
    if std::fs::metadata(image).is_err() {
        return Err(QemuImgError::Missing {
            image: image.to_string(),
        });
    }
    let mut qemu_img = Command::new("qemu-img");
    qemu_img.args(["info", "--output", "json", image]);
    let output = match vmsnap_exec::run_bounded(&mut qemu_img, QUICK_TIMEOUT) {
        Ok(output) => output,
        Err(RunError::Spawn(e)) => return Err(QemuImgError::Spawn(e)),
        Err(RunError::TimedOut) => {
            return Err(QemuImgError::TimedOut {
                command: "info".to_string(),
                image: image.to_string(),
                seconds: QUICK_TIMEOUT.as_secs(),
            })
        }
    };
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    warn!(image, stderr = %stderr.trim(), "qemu-img info failed");
    // qemu-img says so only in words: "Failed to get shared "write" lock".
    let image = image.to_string();
    if stderr.contains("lock") {
        Err(QemuImgError::InUse { image })
    } else {
        Err(QemuImgError::Unreadable { image })
    }
}

/// Commits `top` into its backing file, stopping at `deadline`. A stopped commit leaves the
/// backing file partly merged, which a merge resumed from the journal completes.
pub fn commit(top: &str, deadline: Instant) -> Result<(), QemuImgError> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    run(top, &["commit", "-q", "-d", top], timeout).map(|_| ())
}

/// Points `image` at a new backing file without copying data: only valid when the new backing
/// file has the same content as the old one (it does after a commit of the old one into it).
pub fn rebase_unsafe(image: &str, backing: &str, backing_format: &str) -> Result<(), QemuImgError> {
    let args = ["rebase", "-u", "-b", backing, "-F", backing_format, image];
    run(image, &args, QUICK_TIMEOUT).map(|_| ())
}

/// Makes the empty file qemu-img then formats: new (nothing at `overlay`, not even a symlink)
/// and with the permissions of the image it extends. qemu-img itself would follow a symlink and
/// create the file with the umask's mode.
fn create_overlay_file(overlay: &str, backing: &str) -> Result<(), QemuImgError> {
    crate::files::create_new_image(overlay, backing)?;
    Ok(())
}

/// Creates a qcow2 overlay of `backing`, opening it (a restore's new disk on a snapshot's
/// image): qemu-img reads the whole chain below, so damage past the headers refuses the restore
/// before it changes anything. A snapshot's overlay of a running disk is `overlay::create`'s.
/// The file is made by [`create_overlay_file`] and removed again (it is vmsnapd's own) when
/// qemu-img fails.
pub fn create_overlay(
    overlay: &str,
    backing: &str,
    backing_format: &str,
) -> Result<(), QemuImgError> {
    create_overlay_file(overlay, backing)?;
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_format,
        overlay,
    ];
    run(overlay, &args, QUICK_TIMEOUT)
        .map(drop)
        .inspect_err(|_| {
            let _ = std::fs::remove_file(overlay);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pattern(image: &str, offset: u64, byte: u8) {
        let status = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {byte} {offset} 64k"))
            .arg(image)
            .output()
            .expect("qemu-io runs");
        assert!(status.status.success(), "{status:?}");
    }

    fn read_pattern(image: &str, offset: u64, byte: u8) -> bool {
        let output = Command::new("qemu-io")
            .args(["-f", "qcow2", "-r", "-c"])
            .arg(format!("read -P {byte} {offset} 64k"))
            .arg(image)
            .output()
            .expect("qemu-io runs");
        let text = String::from_utf8_lossy(&output.stdout);
        text.contains("read 65536/65536") && !text.contains("verification failed")
    }

    #[test]
    fn chain_commit_and_rebase_keep_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
        run(
            &base,
            &["create", "-q", "-f", "qcow2", &base, "16M"],
            QUICK_TIMEOUT,
        )
        .expect("create");
        write_pattern(&base, 0, 1);
        create_overlay(&mid, &base, "qcow2").expect("overlay");
        write_pattern(&mid, 65536, 2);
        create_overlay(&top, &mid, "qcow2").expect("overlay");
        write_pattern(&top, 131072, 3);
        assert!(create_overlay(&top, &mid, "qcow2").is_err());

        let chain = backing_chain(&top).expect("chain");
        let paths: Vec<_> = chain.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, [top.as_str(), mid.as_str(), base.as_str()]);

        // Merge mid into base, then point top at base: top's content is unchanged.
        commit(&mid, Instant::now() + QUICK_TIMEOUT).expect("commit");
        rebase_unsafe(&top, &base, "qcow2").expect("rebase");
        let chain = backing_chain(&top).expect("chain");
        assert_eq!(chain.len(), 2);
        assert!(read_pattern(&top, 0, 1));
        assert!(read_pattern(&top, 65536, 2));
        assert!(read_pattern(&top, 131072, 3));
        assert!(!read_pattern(&top, 131072, 9));
    }

    #[test]
    fn overlays_take_the_image_mode_and_failures_keep_qemu_img_output_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let (base, top) = (p("base.qcow2"), p("top.qcow2"));
        run(
            &base,
            &["create", "-q", "-f", "qcow2", &base, "16M"],
            QUICK_TIMEOUT,
        )
        .expect("create");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        create_overlay(&top, &base, "qcow2").expect("overlay");
        let mode = std::fs::metadata(&top).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "the overlay is no more open than its image");

        // qemu-img refuses (a backing file of another format): its own words ("Image is not in
        // qcow2 format", the path of the backing file) stay out of the error, and the empty file
        // vmsnapd made for it is gone again.
        let failed = p("failed.qcow2");
        let error = create_overlay(&failed, &base, "raw-but-wrong-\u{1b}")
            .expect_err("refused")
            .to_string();
        assert!(error.starts_with(&format!("qemu-img create of {failed} failed (exit status ")));
        assert!(
            error.ends_with("its messages are in vmsnapd's journal)"),
            "{error}"
        );
        assert!(!crate::files::path_taken(std::path::Path::new(&failed)));
        let error = backing_chain(&p("missing.qcow2"))
            .expect_err("no such image")
            .to_string();
        assert!(!error.contains("Could not open"), "{error}");
    }

    #[test]
    fn an_overlay_path_already_taken_refuses_the_restore_and_anything_else_fails_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let (base, top) = (p("base.qcow2"), p("top.qcow2"));
        std::fs::write(&base, b"").expect("write");
        std::fs::write(&top, b"precious").expect("write");
        let error =
            crate::ops::OpError::from(create_overlay(&top, &base, "qcow2").expect_err("taken"));
        assert_eq!(
            error,
            crate::ops::OpError::Refused(format!("the overlay {top} already exists"))
        );
        assert_eq!(std::fs::read(&top).expect("read"), b"precious");
        let nowhere = p("no/top.qcow2");
        let error = crate::ops::OpError::from(
            create_overlay(&nowhere, &base, "qcow2").expect_err("no folder"),
        );
        assert!(
            matches!(&error, crate::ops::OpError::Storage(m) if m.starts_with(&format!("cannot create the overlay {nowhere}: "))),
            "a storage failure, naming the path: {error:?}"
        );
    }

    #[test]
    fn an_image_another_process_writes_or_a_missing_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2").to_string_lossy().into_owned();
        run(
            &image,
            &["create", "-q", "-f", "qcow2", &image, "16M"],
            QUICK_TIMEOUT,
        )
        .expect("create");
        assert!(check_not_in_use(&image).is_ok());
        // qemu-io holds it open read-write for as long as it sleeps.
        let mut writer = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "sleep 20000", &image])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io runs");
        let refused = refusal_once_locked(&image);
        let _ = writer.kill();
        let _ = writer.wait();
        assert!(
            refused.contains("is in use by another process"),
            "{refused}"
        );
        assert!(check_not_in_use(&image).is_ok(), "free again");
        let missing = dir.path().join("gone.qcow2").to_string_lossy().into_owned();
        assert!(matches!(
            check_not_in_use(&missing),
            Err(QemuImgError::Missing { image }) if image == missing
        ));
    }

    /// The refusal once the writer holds its image locks. Waiting is read from /proc/locks, which
    /// takes no lock itself: probing with qemu-img while qemu-io opens the image could make
    /// qemu-io's own open fail on our lock instead.
    fn refusal_once_locked(image: &str) -> String {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(image).expect("stat").ino();
        let locked = || {
            std::fs::read_to_string("/proc/locks")
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(&format!(":{inode} ")) && l.ends_with(" 201 201"))
        };
        let end = Instant::now() + Duration::from_secs(60);
        while !locked() {
            if Instant::now() > end {
                return "qemu-io never locked the image".to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        check_not_in_use(image)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }
}
