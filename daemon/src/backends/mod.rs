//! Storage backends: one contract, [`VolumeBackend`], that every kind of disk storage implements
//! (qcow2 files, LVM logical volumes; the unit tests' simulated one), after libvirt's storage
//! drivers. The operation flows in `crate::ops` are written once over it and never ask which
//! backend a volume is on.
//!
//! The contract, per snapshot: `plan` each disk (changes nothing), `prepare` before the freeze
//! what can be made early, `capture` each backend's volumes as one batch inside the freeze
//! (qcow2's is one atomic libvirt call), and `undo` a capture the snapshot does not keep. Per
//! delete: `release`. Per restore: `plan_restore`, `stage_restore` (new images, changes nothing
//! the VM uses), then for backends that restore data in place the point of no return,
//! `restore_in_place` (journaled step by step, finished by `finish_in_place` after a crash),
//! then `keep_restored` or `discard_restored`.

pub mod lvm;
pub mod qcow2;
pub mod rbd;
#[cfg(test)]
pub mod sim;

use std::sync::Arc;
use std::time::Instant;

use vmsnap_api::{DiskInfo, VolumeRestore};

use crate::hypervisor::Host;
use crate::ops::{OpContext, OpError, OpResult};
use crate::store::{Artifact, RestoreRecord, SnapshotRecord, VolumeRecord};

/// What a backend call may use: the operation's settings and journal, and its hypervisor
/// session.
pub struct Env<'a> {
    pub ctx: &'a OpContext,
    pub host: &'a dyn Host,
    /// What a backend's `check_release` found out, for its `release` of the same volume in the
    /// same session (the qcow2 backend's image forest: one scan of the host serves both).
    findings: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl<'a> Env<'a> {
    pub fn new(ctx: &'a OpContext, host: &'a dyn Host) -> Env<'a> {
        Env {
            ctx,
            host,
            findings: std::sync::Mutex::new(None),
        }
    }

    /// Keeps what a check found, replacing what an earlier one kept.
    pub fn keep_finding<T: std::any::Any + Send>(&self, finding: T) {
        *self.findings.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(finding));
    }

    /// Takes what a check kept, when it is a `T`; nothing is kept afterwards either way.
    pub fn take_finding<T: std::any::Any>(&self) -> Option<T> {
        let kept = self
            .findings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        kept.downcast::<T>().ok().map(|b| *b)
    }
}

/// Called before each step of an in-place restore with the step's name; an error stops the
/// restore there (the journal could not be written).
pub type BeforeStep<'a> = dyn FnMut(&'static str) -> OpResult<()> + 'a;

/// One kind of storage. Every method that changes something is idempotent or journaled, so a
/// restarted daemon can call it again.
pub trait VolumeBackend: Send + Sync {
    /// Short name, used in crash-point names and logs.
    fn name(&self) -> &'static str;
    /// Whether this backend snapshots `disk` (as classified from the definition).
    fn takes(&self, disk: &DiskInfo) -> bool;
    /// Whether `volume` is this backend's.
    fn owns(&self, volume: &VolumeRecord) -> bool;

    // Snapshot

    /// Plans `disk`'s volume for `snapshot`: checks it and names what `capture` will make.
    /// Changes nothing. `live_xml` is the definition as the VM uses it now.
    fn plan(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        live_xml: &str,
        disk: &DiskInfo,
    ) -> OpResult<VolumeRecord>;
    /// Before the freeze: makes what can be made ahead, outside the frozen window.
    fn prepare(
        &self,
        _env: &Env,
        _snapshot: &SnapshotRecord,
        _volumes: &[VolumeRecord],
    ) -> OpResult<()> {
        Ok(())
    }
    /// Inside the freeze: captures every volume of the batch, or none (undoing its own part).
    fn capture(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volumes: &[VolumeRecord],
        disks: &[DiskInfo],
    ) -> OpResult<()>;
    /// Whether `volume` was captured (recovery of an interrupted snapshot).
    fn is_captured(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<bool>;
    /// Undoes a capture the snapshot does not keep: the VM's disks are as before it, and what
    /// the capture made is gone. Best effort; what stays is logged.
    fn undo(&self, env: &Env, snapshot: &SnapshotRecord, volumes: &[VolumeRecord]);
    /// Removes what a snapshot that was never taken left behind, never anything in use.
    fn discard(&self, env: &Env, snapshot: &SnapshotRecord, volumes: &[VolumeRecord]);
    /// Checks that a captured volume is intact and restorable.
    fn check_intact(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<()>;

    // Delete

    /// Gives up `deleting`'s volume and reclaims what nothing needs any more, without changing
    /// the content of `others` (whose records it may update where an image they name moves).
    fn release(
        &self,
        env: &Env,
        deleting: &mut SnapshotRecord,
        others: &mut [Arc<SnapshotRecord>],
        volume: &VolumeRecord,
        deadline: Instant,
    ) -> OpResult<()>;

    /// Before a delete changes anything: whether releasing `volume` can be done now (a merge
    /// needs room where it writes). Changes nothing.
    fn check_release(
        &self,
        _env: &Env,
        _deleting: &SnapshotRecord,
        _others: &[Arc<SnapshotRecord>],
        _volume: &VolumeRecord,
    ) -> OpResult<()> {
        Ok(())
    }

    // Restore

    /// Names the image a restore of `volume` gives the target VM's disk. Changes nothing.
    fn plan_restore(
        &self,
        restore: &RestoreRecord,
        volume: &VolumeRecord,
    ) -> OpResult<VolumeRestore>;
    /// Checks what the target needs before anything changes: as a new VM (`new_vm`), or in
    /// place once the VM is off.
    fn check_restore_target(&self, env: &Env, new_vm: bool, volume: &VolumeRecord) -> OpResult<()>;
    /// Makes the restore's new image (changes nothing the VM uses).
    fn stage_restore(
        &self,
        env: &Env,
        restore: &RestoreRecord,
        volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> OpResult<()>;
    /// Whether restoring `volume` in place replaces the disk's data (no going back once begun).
    fn restores_in_place(&self, _volume: &VolumeRecord) -> bool {
        false
    }
    /// Replaces the disk's data with the snapshot's, calling `before` before each step.
    fn restore_in_place(
        &self,
        _env: &Env,
        _volume: &VolumeRecord,
        _before: &mut BeforeStep,
    ) -> OpResult<()> {
        Ok(())
    }
    /// Finishes an in-place restore interrupted after step `last_step` began (None: none).
    fn finish_in_place(
        &self,
        _env: &Env,
        _volume: &VolumeRecord,
        _last_step: Option<&str>,
    ) -> OpResult<()> {
        Ok(())
    }
    /// The source (path, format) the restored definition gives the disk; `None`: as the
    /// snapshot's definition has it.
    fn restored_source(
        &self,
        new_vm: bool,
        volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> Option<(String, &'static str)>;
    /// The restore is done: what it made becomes the VM's for good.
    fn keep_restored(
        &self,
        _env: &Env,
        _restore: &RestoreRecord,
        _planned: &VolumeRestore,
    ) -> OpResult<()> {
        Ok(())
    }
    /// The restore is undone: what it made goes (only that).
    fn discard_restored(
        &self,
        env: &Env,
        restore: &RestoreRecord,
        _volume: &VolumeRecord,
        planned: &VolumeRestore,
    );
    /// After an in-place restore: the disk's previous top `source` is no longer the VM's;
    /// reclaim what no snapshot or VM needs.
    fn release_replaced(
        &self,
        _env: &Env,
        _source: &str,
        _records: &[Arc<SnapshotRecord>],
    ) -> OpResult<()> {
        Ok(())
    }

    // Settling

    /// Makes the checks of VM `vm_uuid`'s images that earlier operations recorded as owed and
    /// could not make (see `rbd`), against `records`, the records now.
    fn retry_pending_checks(&self, _env: &Env, _vm_uuid: &str, _records: &[Arc<SnapshotRecord>]) {}
}

/// The backends in use, in capture order: those whose capture is cheap to undo first (LVM
/// snapshot LVs and RBD snapshots go before qcow2 overlays, whose undo is a merge).
pub struct Backends {
    list: Vec<Arc<dyn VolumeBackend>>,
}

impl Backends {
    pub fn new(list: Vec<Arc<dyn VolumeBackend>>) -> Backends {
        Backends { list }
    }

    /// The real ones.
    pub fn standard() -> Backends {
        Backends::new(vec![
            Arc::new(lvm::LvmBackend),
            Arc::new(rbd::RbdBackend),
            Arc::new(qcow2::Qcow2Backend),
        ])
    }

    pub fn all(&self) -> impl Iterator<Item = &dyn VolumeBackend> {
        self.list.iter().map(|b| b.as_ref())
    }

    pub fn for_disk(&self, disk: &DiskInfo) -> Option<&dyn VolumeBackend> {
        self.list.iter().find(|b| b.takes(disk)).map(|b| b.as_ref())
    }

    pub fn for_volume(&self, volume: &VolumeRecord) -> OpResult<&dyn VolumeBackend> {
        self.list
            .iter()
            .find(|b| b.owns(volume))
            .map(|b| b.as_ref())
            .ok_or_else(|| {
                OpError::Refused(format!(
                    "disk {}: no backend for {} volumes in this vmsnapd",
                    volume.target,
                    volume.backend_name()
                ))
            })
    }

    /// `volumes` grouped by backend, in capture order; each group keeps the volumes' order.
    pub fn batches<'a>(
        &'a self,
        volumes: &[VolumeRecord],
    ) -> OpResult<Vec<(&'a dyn VolumeBackend, Vec<VolumeRecord>)>> {
        if let Some(orphan) = volumes
            .iter()
            .find(|v| !self.list.iter().any(|b| b.owns(v)))
        {
            self.for_volume(orphan)?;
        }
        Ok(self
            .list
            .iter()
            .map(|b| {
                let mine: Vec<VolumeRecord> =
                    volumes.iter().filter(|v| b.owns(v)).cloned().collect();
                (b.as_ref(), mine)
            })
            .filter(|(_, mine)| !mine.is_empty())
            .collect())
    }
}

/// Why a ready snapshot's volume is not usable, from a quick look that calls no tool (at
/// start, for every record): a qcow2 image file that is gone. (RBD snapshots need the cluster:
/// [`ArtifactCheck`].)
pub fn missing_artifact(volume: &VolumeRecord) -> Option<String> {
    match &volume.artifact {
        Artifact::Qcow2 { .. } if std::fs::metadata(&volume.image).is_err() => Some(format!(
            "the image {} of disk {} is missing",
            volume.image, volume.target
        )),
        _ => None,
    }
}

/// The readiness watch's check of every ready snapshot's artifacts, on a thread of its own:
/// qcow2 files looked at, RBD snapshots listed from their cluster (one `rbd snap ls` per image,
/// whatever the number of snapshots).
pub struct ArtifactCheck<'a> {
    ctx: &'a OpContext,
    host: Option<OpResult<Box<dyn Host>>>,
    rbd_snaps: std::collections::HashMap<String, Result<Vec<String>, String>>,
}

impl<'a> ArtifactCheck<'a> {
    pub fn new(ctx: &'a OpContext) -> ArtifactCheck<'a> {
        ArtifactCheck {
            ctx,
            host: None,
            rbd_snaps: Default::default(),
        }
    }

    /// What is missing of `volume`, if anything.
    pub fn missing(&mut self, volume: &VolumeRecord) -> Option<String> {
        let Some(v) = volume.rbd() else {
            return missing_artifact(volume);
        };
        let key = format!(
            "{}|{}|{}|{}",
            v.image_spec(),
            v.monitors.join(","),
            v.user,
            v.secret
        );
        if !self.rbd_snaps.contains_key(&key) {
            let ctx = self.ctx;
            let host = self.host.get_or_insert_with(|| ctx.hypervisor.session());
            let listed = match host {
                Ok(host) => rbd::snaps_of(&Env::new(ctx, host.as_ref()), v),
                Err(e) => Err(format!("cannot reach libvirt for the Ceph key: {e}")),
            };
            self.rbd_snaps.insert(key.clone(), listed);
        }
        match self.rbd_snaps.get(&key) {
            Some(Ok(snaps)) if snaps.contains(&v.snap) => None,
            Some(Ok(_)) => Some(format!(
                "the RBD snapshot {} of disk {} is missing",
                v.snap_spec(),
                volume.target
            )),
            Some(Err(e)) => Some(format!(
                "the RBD snapshot {} of disk {} cannot be checked: {e}",
                v.snap_spec(),
                volume.target
            )),
            None => None,
        }
    }
}
