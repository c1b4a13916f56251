//! The LVM operations vmsnap needs, as a small synchronous library.
//!
//! Every operation runs the `lvm` binary (`lvm lvs ...`, `lvm lvcreate ...`) with
//! [`std::process::Command`]: no shell, arguments passed as they are, `LC_ALL=C`, stdin closed and
//! `LVM_SUPPRESS_FD_WARNINGS=1` (a daemon may hold descriptors LVM would otherwise complain about).
//! Reports use `--reportformat json --units b --nosuffix` and are parsed with serde. A failing
//! command becomes [`Error::Command`] carrying LVM's own message on one line.
//!
//! Calls block until LVM is done (a thick merge can take a while): the daemon calls them from its
//! operation threads. LVM serialises concurrent commands on a VG with its own lock files.
//!
//! Every command has a timeout ([`DEFAULT_TIMEOUT`], 10 minutes, or [`Lvm::with_timeout`]): an
//! `lvm` still running then (stuck on a lock, a hung device, a suspended device-mapper table) is
//! killed with `SIGKILL`, reaped, and the call returns [`Error::Timeout`]. That is safe for LVM's
//! metadata, which each command commits atomically: the change was made completely or not at all
//! (ask LVM which). A merge that `lvconvert --merge` started goes on in the kernel; only the
//! command waiting for it was stopped. The output is read while the command runs, so a command
//! printing a lot cannot block on a full pipe.
//!
//! What is here:
//! - reports: [`Lvm::lv`], [`Lvm::find_lv`], [`Lvm::lvs_tagged`], [`Lvm::fill_percent`], parsed
//!   into [`LvInfo`] (thin or thick, snapshot, invalid/overflowed snapshot, fill);
//! - device paths: [`resolve_device`] (`/dev/VG/LV`, `/dev/mapper/VG-LV`);
//! - names and tags: [`validate_vg_name`], [`validate_lv_name`], [`validate_tag`],
//!   [`vmsnap_tags`];
//! - snapshots: [`Lvm::snapshot_thin`], [`Lvm::snapshot_thick`], [`thick_snapshot_size`],
//!   [`Lvm::remove`], [`Lvm::rename`];
//! - restore: [`Lvm::restore_thin`] (crash safe, see its documentation and
//!   [`Lvm::recover_thin_restore`]) and [`Lvm::restore_thick`] (merge, then re-take; see
//!   [`Lvm::recover_thick_restore`]).

use std::ffi::OsString;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use vmsnap_exec::RunError;

mod names;
mod report;

pub use names::{
    resolve_device, validate_lv_name, validate_tag, validate_vg_name, vmsnap_tags, MAX_NAME_LEN,
    TAG_VMSNAP,
};
pub use report::{parse_lvs_report, LvInfo, LvKind};

/// Errors of this crate. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VG or LV name or a tag that LVM would refuse (or that vmsnap refuses to derive from).
    #[error("invalid {kind} {name:?}: {reason}")]
    InvalidName {
        kind: &'static str,
        name: String,
        reason: String,
    },
    /// The LV does not exist (the VG does).
    #[error("logical volume {vg}/{lv} not found")]
    NotFound { vg: String, lv: String },
    /// An LVM command failed; `message` is LVM's own error output on one line.
    #[error("lvm {command} failed: {message}")]
    Command {
        command: String,
        status: Option<i32>,
        message: String,
    },
    /// An LVM command did not finish within the timeout ([`Lvm::with_timeout`]); it was killed.
    #[error(
        "lvm {command} did not finish within {}; it was stopped (LVM commits its metadata \
         atomically: the change was made completely or not at all; a merge that started \
         continues in the kernel)",
        format_duration(*.after)
    )]
    Timeout { command: String, after: Duration },
    /// The `lvm` program could not be started (or waited for).
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// LVM answered something this crate does not understand.
    #[error("unexpected output of lvm {command}: {reason}")]
    Parse { command: String, reason: String },
    /// The LVs are not in a state that allows the operation (wrong kind, open, leftovers, ...).
    #[error("{0}")]
    InvalidState(String),
    /// A thick snapshot whose copy-on-write space overflowed: its data is lost.
    #[error("snapshot {vg}/{lv} is invalid: its copy-on-write space overflowed")]
    InvalidSnapshot { vg: String, lv: String },
    /// The caller's step callback stopped an operation before `step` (used to journal each step
    /// and to simulate crashes); the LVs are as a crash at that point would leave them.
    #[error("stopped before step {step}")]
    Stopped { step: &'static str },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The fields asked of `lvs`, in the order [`LvInfo`] documents them.
pub const LV_FIELDS: &str =
    "lv_name,vg_name,lv_uuid,lv_size,lv_attr,segtype,pool_lv,origin,data_percent,snap_percent,lv_tags,lv_path";

/// Suffix of the LV a thin restore creates from the snapshot (`<origin>.vmsnap-new`).
pub const RESTORE_NEW_SUFFIX: &str = ".vmsnap-new";
/// Suffix the origin is renamed to during a thin restore (`<origin>.vmsnap-old`).
pub const RESTORE_OLD_SUFFIX: &str = ".vmsnap-old";
/// Tag on the LV a thin restore creates, removed as its last step; recovery trusts only LVs
/// carrying it.
pub const TAG_RESTORE_NEW: &str = "vmsnap-restore-new";

/// The steps of [`Lvm::restore_thin`], in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinRestoreStep {
    /// `lvcreate -s VG/SNAP -n ORIGIN.vmsnap-new` (tagged `vmsnap-restore-new`).
    CreateNew,
    /// `lvrename VG ORIGIN ORIGIN.vmsnap-old`.
    RenameOriginToOld,
    /// `lvrename VG ORIGIN.vmsnap-new ORIGIN`.
    RenameNewToOrigin,
    /// `lvremove VG/ORIGIN.vmsnap-old`.
    RemoveOld,
    /// `lvchange --deltag vmsnap-restore-new VG/ORIGIN`.
    Untag,
}

impl ThinRestoreStep {
    pub fn name(self) -> &'static str {
        match self {
            ThinRestoreStep::CreateNew => "create-new",
            ThinRestoreStep::RenameOriginToOld => "rename-origin-to-old",
            ThinRestoreStep::RenameNewToOrigin => "rename-new-to-origin",
            ThinRestoreStep::RemoveOld => "remove-old",
            ThinRestoreStep::Untag => "untag",
        }
    }
}

/// The steps of [`Lvm::restore_thick`], in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThickRestoreStep {
    /// `lvconvert --merge VG/SNAP` (consumes the snapshot).
    Merge,
    /// `lvcreate -s VG/ORIGIN -n SNAP -L SIZE` with the snapshot's tags.
    Retake,
}

impl ThickRestoreStep {
    pub fn name(self) -> &'static str {
        match self {
            ThickRestoreStep::Merge => "merge",
            ThickRestoreStep::Retake => "retake",
        }
    }
}

/// What [`Lvm::recover_thin_restore`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinRecovery {
    /// No restore was under way (no leftover LV, no restore tag).
    Nothing,
    /// The restore had not replaced the origin yet: its leftovers were removed, the origin is the
    /// old one.
    RolledBack,
    /// The restore had gone far enough: it was finished, the origin is the snapshot's content.
    RolledForward,
}

/// What [`Lvm::recover_thick_restore`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThickRecovery {
    /// The snapshot exists and is not merging: nothing to do.
    Nothing,
    /// A merge was still pending or running; it was finished and the snapshot re-taken.
    MergedAndRetaken,
    /// The merge had finished but the snapshot was missing; it was re-taken.
    Retaken,
}

/// How long an LVM command may run by default before it is killed ([`Lvm::with_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Handle on the `lvm` program. Cheap to clone; holds no state but the program's path and the
/// commands' timeout.
#[derive(Debug, Clone)]
pub struct Lvm {
    program: PathBuf,
    timeout: Duration,
}

impl Default for Lvm {
    fn default() -> Self {
        Lvm::new()
    }
}

impl Lvm {
    /// Uses `lvm` from `PATH`.
    pub fn new() -> Lvm {
        Lvm::with_program("lvm")
    }

    /// Uses this `lvm` binary (tests use a fake one).
    pub fn with_program(program: impl Into<PathBuf>) -> Lvm {
        Lvm {
            program: program.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Kills any LVM command still running after `timeout` ([`Error::Timeout`]); the default is
    /// [`DEFAULT_TIMEOUT`]. `Duration::MAX` waits for ever. A thick restore's `lvconvert
    /// --merge` waits for the merge, which takes time proportional to the data changed since the
    /// snapshot: allow for it.
    pub fn with_timeout(self, timeout: Duration) -> Lvm {
        Lvm { timeout, ..self }
    }

    /// The timeout of each LVM command (see [`Lvm::with_timeout`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `lvm SUBCOMMAND ARGS...` and returns its standard output. A non-zero exit becomes
    /// [`Error::Command`] with LVM's message (see [`lvm_message`]).
    ///
    /// It runs with [`vmsnap_exec::run_bounded`]: output read while it runs, killed (`SIGKILL`)
    /// and reaped if still running after the timeout ([`Lvm::with_timeout`]), which gives
    /// [`Error::Timeout`] (see the module documentation for what that leaves).
    pub fn run<I, S>(&self, subcommand: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let spawn_error = |source| Error::Spawn {
            program: self.program.display().to_string(),
            source,
        };
        let mut command = Command::new(&self.program);
        command
            .arg(subcommand)
            .args(&args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1");
        match vmsnap_exec::run_bounded(&mut command, self.timeout) {
            Ok(done) => command_result(subcommand, done.status, &done.stdout, &done.stderr),
            Err(RunError::TimedOut) => Err(Error::Timeout {
                command: subcommand.to_string(),
                after: self.timeout,
            }),
            Err(RunError::Spawn(e)) => Err(spawn_error(e)),
        }
    }

    fn report(&self, selector: &str, extra: &[&str]) -> Result<Vec<LvInfo>> {
        let mut args = vec![
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            LV_FIELDS,
        ];
        args.extend_from_slice(extra);
        args.push(selector);
        let out = self.run("lvs", args)?;
        parse_lvs_report(&out).map_err(|reason| Error::Parse {
            command: "lvs".into(),
            reason,
        })
    }

    /// The LV `vg/lv`, or `None` if the VG exists but has no such LV. Lists the VG and picks the
    /// LV, so a missing LV is told apart from a failing command without parsing messages.
    pub fn find_lv(&self, vg: &str, lv: &str) -> Result<Option<LvInfo>> {
        validate_vg_name(vg)?;
        validate_lv_name(lv)?;
        let lvs = self.report(vg, &[])?;
        Ok(lvs.into_iter().find(|l| l.name == lv && l.vg == vg))
    }

    /// The LV `vg/lv`; [`Error::NotFound`] if it does not exist.
    pub fn lv(&self, vg: &str, lv: &str) -> Result<LvInfo> {
        self.find_lv(vg, lv)?.ok_or_else(|| Error::NotFound {
            vg: vg.into(),
            lv: lv.into(),
        })
    }

    /// Every LV (in every VG) carrying `tag` (`lvm lvs @TAG`), e.g. [`TAG_VMSNAP`].
    pub fn lvs_tagged(&self, tag: &str) -> Result<Vec<LvInfo>> {
        validate_tag(tag)?;
        self.report(&format!("@{tag}"), &[])
    }

    /// How full `vg/lv` is, in percent: for a thick snapshot its copy-on-write space
    /// (`snap_percent`; 100 means overflowed), for a thin LV or pool its `data_percent`. `None`
    /// for an LV that has no such figure (a plain thick LV, or an inactive one).
    pub fn fill_percent(&self, vg: &str, lv: &str) -> Result<Option<f64>> {
        Ok(self.lv(vg, lv)?.fill_percent())
    }

    /// Takes a thin snapshot `vg/name` of the thin LV `vg/origin`, activated (`-kn -ay`: thin
    /// snapshots otherwise get the activation-skip flag and stay inactive), with `tags`.
    pub fn snapshot_thin(
        &self,
        vg: &str,
        origin: &str,
        name: &str,
        tags: &[String],
    ) -> Result<LvInfo> {
        validate_vg_name(vg)?;
        validate_lv_name(origin)?;
        validate_lv_name(name)?;
        let origin_lv = self.lv(vg, origin)?;
        if origin_lv.kind != LvKind::Thin {
            return Err(Error::InvalidState(format!(
                "{vg}/{origin} is not a thin LV (segtype {})",
                origin_lv.segtype
            )));
        }
        let mut args: Vec<String> = vec![
            "-s".into(),
            format!("{vg}/{origin}"),
            "-n".into(),
            name.into(),
            "-kn".into(),
            "-ay".into(),
        ];
        push_tags(&mut args, tags)?;
        self.run("lvcreate", &args)?;
        self.lv(vg, name)
    }

    /// Takes a classic copy-on-write snapshot `vg/name` of the thick LV `vg/origin` with
    /// `size_bytes` of copy-on-write space (LVM rounds it up to whole extents and reduces it to
    /// what the origin can use at most), with `tags`.
    pub fn snapshot_thick(
        &self,
        vg: &str,
        origin: &str,
        name: &str,
        size_bytes: u64,
        tags: &[String],
    ) -> Result<LvInfo> {
        validate_vg_name(vg)?;
        validate_lv_name(origin)?;
        validate_lv_name(name)?;
        if size_bytes == 0 {
            return Err(Error::InvalidState(
                "a thick snapshot needs a non-zero size".into(),
            ));
        }
        let origin_lv = self.lv(vg, origin)?;
        if origin_lv.kind != LvKind::Thick || origin_lv.is_snapshot() {
            return Err(Error::InvalidState(format!(
                "{vg}/{origin} is not a thick LV (segtype {}, attr {})",
                origin_lv.segtype, origin_lv.attr
            )));
        }
        let mut args: Vec<String> = vec![
            "-s".into(),
            format!("{vg}/{origin}"),
            "-n".into(),
            name.into(),
            "-L".into(),
            format!("{}b", round_up(size_bytes, 512)),
        ];
        push_tags(&mut args, tags)?;
        self.run("lvcreate", &args)?;
        self.lv(vg, name)
    }

    /// Removes `vg/lv` (`lvremove -y`). Removing a thin or thick snapshot changes nothing else.
    pub fn remove(&self, vg: &str, lv: &str) -> Result<()> {
        validate_vg_name(vg)?;
        validate_lv_name(lv)?;
        self.run("lvremove", ["-y".to_string(), format!("{vg}/{lv}")])?;
        Ok(())
    }

    /// Renames `vg/from` to `vg/to` (`lvrename`).
    pub fn rename(&self, vg: &str, from: &str, to: &str) -> Result<()> {
        validate_vg_name(vg)?;
        validate_lv_name(from)?;
        validate_lv_name(to)?;
        self.run("lvrename", [vg, from, to])?;
        Ok(())
    }

    /// Adds and removes tags of `vg/lv` (`lvchange --addtag/--deltag`).
    pub fn change_tags(&self, vg: &str, lv: &str, add: &[String], del: &[String]) -> Result<()> {
        validate_vg_name(vg)?;
        validate_lv_name(lv)?;
        if add.is_empty() && del.is_empty() {
            return Ok(());
        }
        let mut args = Vec::new();
        push_tags(&mut args, add)?;
        for tag in del {
            validate_tag(tag)?;
            args.push("--deltag".to_string());
            args.push(tag.clone());
        }
        args.push(format!("{vg}/{lv}"));
        self.run("lvchange", &args)?;
        Ok(())
    }

    /// Replaces the thin LV `vg/origin` by a new thin LV made from its thin snapshot
    /// `vg/snapshot`; the snapshot is kept. The cost does not depend on the LV's size (metadata
    /// only). The origin must not be open (the VM is shut off).
    ///
    /// Steps ([`ThinRestoreStep`]), with N = `origin.vmsnap-new`, O = `origin.vmsnap-old`:
    ///
    /// | # | step | a crash after it leaves | recovery ([`Lvm::recover_thin_restore`]) |
    /// |---|---|---|---|
    /// | 1 | `lvcreate -s VG/SNAP -n N --addtag vmsnap-restore-new` (+ origin's tags) | origin, N | remove N: back to before |
    /// | 2 | `lvrename VG origin O` | O, N (no origin) | rename N to origin, remove O: after |
    /// | 3 | `lvrename VG N origin` | origin (tagged), O | remove O: after |
    /// | 4 | `lvremove VG/O` | origin (tagged) | drop the tag: after |
    /// | 5 | `lvchange --deltag vmsnap-restore-new VG/origin` | origin | nothing |
    ///
    /// LVM has no atomic swap of two names, so between steps 2 and 3 the origin's *name* does not
    /// exist; its data does at every moment, twice: the old data in O and the restored data in N,
    /// both complete. The state is told from names and the `vmsnap-restore-new` tag alone, so a
    /// restarted daemon settles it (before the swap: back; from step 2 on: forward) without
    /// needing its journal, and recovery is idempotent. The VM must stay shut off until the
    /// restore or its recovery has finished. Each LVM command commits its metadata atomically,
    /// so a crash inside a step leaves that step done or not done.
    ///
    /// The new LV gets the origin's tags and the origin's activation state; any other LV
    /// attribute LVM does not copy to snapshots (e.g. a custom read-ahead) is not carried over.
    pub fn restore_thin(&self, vg: &str, origin: &str, snapshot: &str) -> Result<()> {
        self.restore_thin_with(vg, origin, snapshot, |_| ControlFlow::Continue(()))
    }

    /// [`Lvm::restore_thin`], calling `before` before each step; `ControlFlow::Break` stops there
    /// with [`Error::Stopped`] (journal each step there, or simulate a crash).
    pub fn restore_thin_with(
        &self,
        vg: &str,
        origin: &str,
        snapshot: &str,
        mut before: impl FnMut(ThinRestoreStep) -> ControlFlow<()>,
    ) -> Result<()> {
        let (new, old) = restore_names(origin)?;
        validate_lv_name(snapshot)?;
        let lvs = self.report(vg, &[])?;
        let find = |name: &str| lvs.iter().find(|l| l.name == name);
        let origin_lv = find(origin).ok_or_else(|| Error::NotFound {
            vg: vg.into(),
            lv: origin.into(),
        })?;
        let snap_lv = find(snapshot).ok_or_else(|| Error::NotFound {
            vg: vg.into(),
            lv: snapshot.into(),
        })?;
        if origin_lv.kind != LvKind::Thin || snap_lv.kind != LvKind::Thin {
            return Err(Error::InvalidState(format!(
                "thin restore needs thin LVs: {vg}/{origin} is {}, {vg}/{snapshot} is {}",
                origin_lv.segtype, snap_lv.segtype
            )));
        }
        if origin_lv.pool_lv != snap_lv.pool_lv {
            return Err(Error::InvalidState(format!(
                "{vg}/{snapshot} is not in the thin pool of {vg}/{origin}"
            )));
        }
        if origin_lv.is_open() {
            return Err(Error::InvalidState(format!(
                "{vg}/{origin} is open (is the VM running?)"
            )));
        }
        if let Some(left) = [&new, &old].into_iter().find(|n| find(n).is_some()) {
            return Err(Error::InvalidState(format!(
                "{vg}/{left} is left over from an interrupted restore: recover first"
            )));
        }
        if origin_lv.tags.iter().any(|t| t == TAG_RESTORE_NEW) {
            return Err(Error::InvalidState(format!(
                "{vg}/{origin} carries {TAG_RESTORE_NEW} from an interrupted restore: recover first"
            )));
        }
        let step = |s: ThinRestoreStep,
                    before: &mut dyn FnMut(ThinRestoreStep) -> ControlFlow<()>| {
            match before(s) {
                ControlFlow::Continue(()) => Ok(()),
                ControlFlow::Break(()) => Err(Error::Stopped { step: s.name() }),
            }
        };

        step(ThinRestoreStep::CreateNew, &mut before)?;
        let mut args: Vec<String> = vec![
            "-s".into(),
            format!("{vg}/{snapshot}"),
            "-n".into(),
            new.clone(),
            if origin_lv.activation_skip() {
                "-ky".into()
            } else {
                "-kn".into()
            },
        ];
        if origin_lv.is_active() {
            args.push("-ay".into());
            if origin_lv.activation_skip() {
                args.push("-K".into());
            }
        } else {
            args.push("-an".into());
        }
        let mut tags = vec![TAG_RESTORE_NEW.to_string()];
        tags.extend(origin_lv.tags.iter().cloned());
        push_tags(&mut args, &tags)?;
        self.run("lvcreate", &args)?;

        step(ThinRestoreStep::RenameOriginToOld, &mut before)?;
        self.rename(vg, origin, &old)?;
        step(ThinRestoreStep::RenameNewToOrigin, &mut before)?;
        self.rename(vg, &new, origin)?;
        step(ThinRestoreStep::RemoveOld, &mut before)?;
        self.remove(vg, &old)?;
        step(ThinRestoreStep::Untag, &mut before)?;
        self.change_tags(vg, origin, &[], &[TAG_RESTORE_NEW.to_string()])
    }

    /// Settles an interrupted [`Lvm::restore_thin`] of `vg/origin` from the LVs alone (see the
    /// table there). Idempotent; refuses (touching nothing) a combination no restore leaves.
    pub fn recover_thin_restore(&self, vg: &str, origin: &str) -> Result<ThinRecovery> {
        let (new, old) = restore_names(origin)?;
        let lvs = self.report(vg, &[])?;
        let find = |name: &str| lvs.iter().find(|l| l.name == name);
        let tagged = |l: &LvInfo| l.tags.iter().any(|t| t == TAG_RESTORE_NEW);
        let untag = vec![TAG_RESTORE_NEW.to_string()];
        match (find(origin), find(&new), find(&old)) {
            (Some(o), None, None) => {
                if tagged(o) {
                    self.change_tags(vg, origin, &[], &untag)?;
                    Ok(ThinRecovery::RolledForward)
                } else {
                    Ok(ThinRecovery::Nothing)
                }
            }
            (Some(o), Some(n), None) if tagged(n) && !tagged(o) => {
                self.remove(vg, &new)?;
                Ok(ThinRecovery::RolledBack)
            }
            (None, Some(n), Some(_)) if tagged(n) => {
                self.rename(vg, &new, origin)?;
                self.remove(vg, &old)?;
                self.change_tags(vg, origin, &[], &untag)?;
                Ok(ThinRecovery::RolledForward)
            }
            (Some(o), None, Some(_)) if tagged(o) => {
                self.remove(vg, &old)?;
                self.change_tags(vg, origin, &[], &untag)?;
                Ok(ThinRecovery::RolledForward)
            }
            (None, None, Some(_)) => {
                // No restore removes the new LV once the origin is renamed; bring the old back.
                self.rename(vg, &old, origin)?;
                Ok(ThinRecovery::RolledBack)
            }
            (o, n, b) => Err(Error::InvalidState(format!(
                "cannot settle the restore of {vg}/{origin}: found {}{}{}",
                describe(origin, o),
                describe(&new, n),
                describe(&old, b)
            ))),
        }
    }

    /// Restores the thick LV `vg/origin` from its thick snapshot `vg/snapshot`: `lvconvert
    /// --merge` copies the snapshot's blocks back into the origin and consumes the snapshot, then
    /// a snapshot of the same name, copy-on-write size and tags is taken again so the snapshot
    /// stays restorable. Returns the re-taken snapshot.
    ///
    /// Trade-offs: the merge costs time proportional to the data changed since the snapshot (not
    /// the LV size); it cannot be undone once started (the state before the restore is lost);
    /// the re-taken snapshot is a new LV (new LV UUID, empty copy-on-write space) with the same
    /// content; other snapshots of the same origin survive but their copy-on-write space fills
    /// with the merged blocks. The origin must be active and not open (VM shut off): LVM defers
    /// the merge of an open origin to its next activation.
    ///
    /// Crash safety: after `lvconvert --merge` starts, LVM's metadata records the merge; a
    /// crash leaves the snapshot merging (origin attr `O`) or already gone. The VM must not
    /// start until [`Lvm::recover_thick_restore`] has finished the merge and re-taken the
    /// snapshot, otherwise the re-taken snapshot would not hold the restored content. The caller
    /// journals the snapshot's size and tags before calling (recovery needs them).
    pub fn restore_thick(&self, vg: &str, origin: &str, snapshot: &str) -> Result<LvInfo> {
        self.restore_thick_with(vg, origin, snapshot, |_| ControlFlow::Continue(()))
    }

    /// [`Lvm::restore_thick`], calling `before` before each step; `ControlFlow::Break` stops
    /// there with [`Error::Stopped`].
    pub fn restore_thick_with(
        &self,
        vg: &str,
        origin: &str,
        snapshot: &str,
        mut before: impl FnMut(ThickRestoreStep) -> ControlFlow<()>,
    ) -> Result<LvInfo> {
        validate_vg_name(vg)?;
        validate_lv_name(origin)?;
        validate_lv_name(snapshot)?;
        let lvs = self.report(vg, &[])?;
        let find = |name: &str| lvs.iter().find(|l| l.name == name);
        let origin_lv = find(origin).ok_or_else(|| Error::NotFound {
            vg: vg.into(),
            lv: origin.into(),
        })?;
        let snap = find(snapshot).ok_or_else(|| Error::NotFound {
            vg: vg.into(),
            lv: snapshot.into(),
        })?;
        if !snap.is_thick_snapshot() || snap.origin.as_deref() != Some(origin) {
            return Err(Error::InvalidState(format!(
                "{vg}/{snapshot} is not a thick snapshot of {vg}/{origin}"
            )));
        }
        if snap.is_invalid() {
            return Err(Error::InvalidSnapshot {
                vg: vg.into(),
                lv: snapshot.into(),
            });
        }
        if origin_lv.is_open() {
            return Err(Error::InvalidState(format!(
                "{vg}/{origin} is open (is the VM running?)"
            )));
        }
        if !origin_lv.is_active() {
            return Err(Error::InvalidState(format!(
                "{vg}/{origin} is not active: activate it first (LVM defers merges of inactive origins)"
            )));
        }
        let (size, tags) = (snap.size, snap.tags.clone());
        if before(ThickRestoreStep::Merge).is_break() {
            return Err(Error::Stopped {
                step: ThickRestoreStep::Merge.name(),
            });
        }
        self.run("lvconvert", merge_args(vg, snapshot))?;
        if before(ThickRestoreStep::Retake).is_break() {
            return Err(Error::Stopped {
                step: ThickRestoreStep::Retake.name(),
            });
        }
        self.snapshot_thick(vg, origin, snapshot, size, &tags)
    }

    /// Settles an interrupted [`Lvm::restore_thick`]: finishes a merge still pending or running
    /// (`lvconvert --merge` again, which waits for it) and re-takes the snapshot `vg/snapshot`
    /// with `size_bytes` and `tags` (as journaled before the restore) if it is missing.
    /// Idempotent.
    pub fn recover_thick_restore(
        &self,
        vg: &str,
        origin: &str,
        snapshot: &str,
        size_bytes: u64,
        tags: &[String],
    ) -> Result<ThickRecovery> {
        let mut merged = false;
        if let Some(snap) = self.find_lv(vg, snapshot)? {
            if !snap.is_merging() {
                return Ok(ThickRecovery::Nothing);
            }
            self.run("lvconvert", merge_args(vg, snapshot))?;
            merged = true;
            if self.find_lv(vg, snapshot)?.is_some() {
                return Err(Error::InvalidState(format!(
                    "the merge of {vg}/{snapshot} did not finish (is {vg}/{origin} open or inactive?)"
                )));
            }
        }
        self.snapshot_thick(vg, origin, snapshot, size_bytes, tags)?;
        Ok(if merged {
            ThickRecovery::MergedAndRetaken
        } else {
            ThickRecovery::Retaken
        })
    }
}

/// Copy-on-write size for a thick snapshot of an origin of `origin_size` bytes: `percent` of it
/// (rounded up), at least `min_bytes`, rounded up to a 512-byte sector. LVM rounds further up to
/// whole extents and caps it at what the origin can use.
pub fn thick_snapshot_size(origin_size: u64, percent: f64, min_bytes: u64) -> u64 {
    let percent = if percent.is_finite() && percent > 0.0 {
        percent
    } else {
        0.0
    };
    // f64 is exact for sizes up to 2^53 bytes (8 PiB); saturate beyond.
    let share = (origin_size as f64 * percent / 100.0).ceil();
    let share = if share >= u64::MAX as f64 {
        u64::MAX
    } else {
        share as u64
    };
    round_up(share.max(min_bytes), 512)
}

/// The names a thin restore of `origin` uses: (`origin.vmsnap-new`, `origin.vmsnap-old`).
pub fn restore_names(origin: &str) -> Result<(String, String)> {
    validate_lv_name(origin)?;
    let new = format!("{origin}{RESTORE_NEW_SUFFIX}");
    let old = format!("{origin}{RESTORE_OLD_SUFFIX}");
    validate_lv_name(&new)?;
    validate_lv_name(&old)?;
    Ok((new, old))
}

/// LVM's error output as one line: the distinct non-empty lines joined with "; ", without the hint
/// ``Run `lvcreate --help' for more information.``; warnings only if nothing else was said.
pub fn lvm_message(stderr: &str) -> String {
    let mut seen = std::collections::HashSet::new();
    let mut lines: Vec<&str> = Vec::new();
    for line in stderr.lines().map(str::trim) {
        if !line.is_empty() && !is_help_hint(line) && seen.insert(line) {
            lines.push(line);
        }
    }
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("WARNING:"))
        .collect();
    if errors.is_empty() {
        lines.join("; ")
    } else {
        errors.join("; ")
    }
}

/// LVM's ``Run `lvcreate --help' for more information.`` after a usage error.
fn is_help_hint(line: &str) -> bool {
    line.starts_with("Run `") && line.ends_with("for more information.")
}

fn push_tags(args: &mut Vec<String>, tags: &[String]) -> Result<()> {
    for tag in tags {
        validate_tag(tag)?;
        args.push("--addtag".into());
        args.push(tag.clone());
    }
    Ok(())
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to).saturating_mul(to)
}

fn describe(name: &str, lv: Option<&LvInfo>) -> String {
    match lv {
        Some(l) => format!("[{name} tags={}] ", l.tags.join(",")),
        None => String::new(),
    }
}

/// The result of a finished LVM command: its standard output, or [`Error::Command`].
fn command_result(
    subcommand: &str,
    status: ExitStatus,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<String> {
    if status.success() {
        return Ok(String::from_utf8_lossy(stdout).into_owned());
    }
    let mut message = lvm_message(&String::from_utf8_lossy(stderr));
    if message.is_empty() {
        message = match status.code() {
            Some(code) => format!("exit status {code}"),
            None => "killed by a signal".to_string(),
        };
    }
    Err(Error::Command {
        command: subcommand.to_string(),
        status: status.code(),
        message,
    })
}

/// `10m`, `1h`, `30s`, `200ms`; other durations as `Duration`'s `Debug` (`1.5s`).
fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs > 0 {
        if secs.is_multiple_of(3600) {
            format!("{}h", secs / 3600)
        } else if secs.is_multiple_of(60) {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        }
    } else {
        format!("{d:?}")
    }
}

/// Whether `path` looks like an LVM device path; see [`resolve_device`].
pub fn is_lvm_path(path: &Path) -> bool {
    resolve_device(path).is_some()
}

/// `lvconvert --merge` waits for the merge, polling its progress; LVM's default interval is 15 s,
/// which alone would make a small merge take 15 s (measured in BENCHMARKS.md).
fn merge_args(vg: &str, snapshot: &str) -> [String; 4] {
    [
        "--merge".to_string(),
        "--interval".to_string(),
        "1".to_string(),
        format!("{vg}/{snapshot}"),
    ]
}

#[cfg(test)]
mod tests;
