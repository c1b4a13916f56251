//! The LVM backend: disks on LVM logical volumes, through the `vmsnap-lvm` library. Nothing
//! here calls libvirt; the operation flows call it from their operation threads (LVM commands
//! block, each with the configured timeout).
//!
//! A snapshot's LVM volume is one snapshot LV, `<origin>.vmsnap-<first 8 of the snapshot UUID>`,
//! tagged `vmsnap`, `vmsnap-vm-<VM UUID>` and `vmsnap-snap-<snapshot UUID>`: a thin snapshot of a
//! thin LV, or a classic copy-on-write snapshot of a thick LV sized by `[lvm]` config. Only LVs
//! carrying the snapshot's tag are ever removed, so a name clash cannot destroy a user's LV.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use vmsnap_lvm::{LvKind, Lvm, ThickRestoreStep, ThinRestoreStep};

use vmsnap_api::{DiskBackend, DiskInfo, VolumeRestore};

use super::{BeforeStep, Env, VolumeBackend};
use crate::config::LvmConfig;
use crate::ops::{OpError, OpResult, StorageContext};
use crate::store::{Artifact, LvmVolume, VolumeRecord};
use crate::store::{RestoreRecord, SnapshotRecord};

/// Suffix of a snapshot LV's name before the short snapshot UUID.
const SNAPSHOT_SUFFIX: &str = ".vmsnap-";
/// The journal's mark for a volume whose restore finished.
pub const STEP_DONE: &str = "done";

pub fn tool(config: &LvmConfig) -> Lvm {
    Lvm::new().with_timeout(config.command_timeout)
}

fn snapshot_tag(snapshot_uuid: &str) -> String {
    format!("vmsnap-snap-{snapshot_uuid}")
}

/// Plans disk `target` (on the LV at `source`) for snapshot `snapshot_uuid`: checks the LV and
/// names the snapshot LV. Changes nothing.
pub fn plan(
    lvm: &Lvm,
    config: &LvmConfig,
    target: &str,
    source: &str,
    vm_uuid: &str,
    snapshot_uuid: &str,
) -> Result<VolumeRecord, String> {
    let fail = |e: &dyn std::fmt::Display| format!("disk {target}: {e}");
    let (vg, origin) = vmsnap_lvm::resolve_device(Path::new(source)).ok_or_else(|| {
        fail(&format!(
            "{source} is an LVM volume but not named /dev/VG/LV or /dev/mapper/VG-LV; use one of those paths in the VM definition"
        ))
    })?;
    let info = lvm.lv(&vg, &origin).map_err(|e| fail(&e))?;
    let thin = match info.kind {
        _ if info.is_thick_snapshot() => {
            return Err(fail(&format!(
                "{vg}/{origin} is itself a thick snapshot; LVM cannot snapshot it"
            )))
        }
        LvKind::Thin => true,
        LvKind::Thick => false,
        _ => {
            return Err(fail(&format!(
                "{vg}/{origin} is a {} LV, which vmsnap cannot snapshot",
                info.segtype
            )))
        }
    };
    let short = snapshot_uuid.get(..8).unwrap_or(snapshot_uuid);
    let snapshot = format!("{origin}{SNAPSHOT_SUFFIX}{short}");
    vmsnap_lvm::validate_lv_name(&snapshot).map_err(|e| fail(&e))?;
    if lvm.find_lv(&vg, &snapshot).map_err(|e| fail(&e))?.is_some() {
        return Err(fail(&format!("{vg}/{snapshot} already exists")));
    }
    let tags = vmsnap_lvm::vmsnap_tags(vm_uuid, snapshot_uuid).map_err(|e| fail(&e))?;
    Ok(VolumeRecord {
        target: target.to_string(),
        image: format!("/dev/{vg}/{snapshot}"),
        virtual_size: info.size,
        artifact: Artifact::Lvm(LvmVolume {
            vg,
            origin,
            snapshot,
            thin,
            cow_size: if thin {
                0
            } else {
                config.thick_size_for(info.size)
            },
            tags,
        }),
    })
}

/// Takes the snapshot LVs of `volumes` (those on LVM), in order. On failure, removes those it
/// took and returns LVM's message.
pub fn take(lvm: &Lvm, snapshot_uuid: &str, volumes: &[VolumeRecord]) -> Result<(), String> {
    for volume in volumes {
        let Some(l) = volume.lvm() else { continue };
        let taken = if l.thin {
            lvm.snapshot_thin(&l.vg, &l.origin, &l.snapshot, &l.tags)
        } else {
            lvm.snapshot_thick(&l.vg, &l.origin, &l.snapshot, l.cow_size, &l.tags)
        };
        if let Err(e) = taken {
            discard(lvm, snapshot_uuid, volumes);
            return Err(format!("disk {}: {e}", volume.target));
        }
    }
    Ok(())
}

/// Whether the snapshot LV of `volume` exists (and is this snapshot's).
pub fn is_taken(lvm: &Lvm, snapshot_uuid: &str, volume: &VolumeRecord) -> Result<bool, String> {
    let Some(l) = volume.lvm() else {
        return Ok(false);
    };
    let found = lvm
        .find_lv(&l.vg, &l.snapshot)
        .map_err(|e| format!("disk {}: {e}", volume.target))?;
    Ok(found.is_some_and(|lv| lv.tags.contains(&snapshot_tag(snapshot_uuid))))
}

/// Removes the snapshot LVs of `volumes` that exist and carry this snapshot's tag. Best effort
/// (used on failure paths); what stays is logged.
pub fn discard(lvm: &Lvm, snapshot_uuid: &str, volumes: &[VolumeRecord]) {
    for volume in volumes {
        if let Err(e) = remove(lvm, snapshot_uuid, volume) {
            tracing::warn!(disk = %volume.target, error = %e, "cannot remove a snapshot LV");
        }
    }
}

/// Removes the snapshot LV of `volume` if it exists and is this snapshot's; nothing else
/// changes (a thin or thick snapshot's removal leaves its origin and other snapshots as they
/// are).
pub fn remove(lvm: &Lvm, snapshot_uuid: &str, volume: &VolumeRecord) -> Result<(), String> {
    let Some(l) = volume.lvm() else { return Ok(()) };
    if is_taken(lvm, snapshot_uuid, volume)? {
        lvm.remove(&l.vg, &l.snapshot)
            .map_err(|e| format!("disk {}: {e}", volume.target))?;
    }
    Ok(())
}

/// Checks that `volume`'s snapshot LV can be restored from: present, this snapshot's, valid.
pub fn check_restorable(
    lvm: &Lvm,
    snapshot_uuid: &str,
    volume: &VolumeRecord,
) -> Result<(), String> {
    let Some(l) = volume.lvm() else { return Ok(()) };
    let found = lvm
        .find_lv(&l.vg, &l.snapshot)
        .map_err(|e| format!("disk {}: {e}", volume.target))?;
    match found {
        None => Err(format!(
            "disk {}: the snapshot LV {}/{} is missing",
            volume.target, l.vg, l.snapshot
        )),
        Some(lv) if !lv.tags.contains(&snapshot_tag(snapshot_uuid)) => Err(format!(
            "disk {}: {}/{} is not this snapshot's LV (tag {} missing)",
            volume.target,
            l.vg,
            l.snapshot,
            snapshot_tag(snapshot_uuid)
        )),
        Some(lv) if lv.is_invalid() => Err(overflow_message(&volume.target, &l.vg, &l.snapshot)),
        Some(_) => Ok(()),
    }
}

/// Checks what an in-place restore of `volume` needs before anything changes: the origin LV
/// exists and is not open (the VM is off), and a thick origin is active (LVM defers the merge of
/// an inactive one).
pub fn check_in_place(lvm: &Lvm, volume: &VolumeRecord) -> Result<(), String> {
    let Some(l) = volume.lvm() else { return Ok(()) };
    let fail = |what: String| format!("disk {}: {what}", volume.target);
    let origin = lvm
        .find_lv(&l.vg, &l.origin)
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail(format!("its LV {}/{} is missing", l.vg, l.origin)))?;
    if origin.is_open() {
        return Err(fail(format!(
            "{}/{} is open: something still uses it (the VM, a mount, another process)",
            l.vg, l.origin
        )));
    }
    if !l.thin && !origin.is_active() {
        return Err(fail(format!(
            "{}/{} is not active: activate it (lvchange -ay) so the merge can run",
            l.vg, l.origin
        )));
    }
    Ok(())
}

pub fn overflow_message(target: &str, vg: &str, lv: &str) -> String {
    format!(
        "disk {target}: the thick LVM snapshot {vg}/{lv} overflowed (its copy-on-write space filled up), so its data is lost; delete this snapshot, and give thick snapshots more space with [lvm] thick_snapshot_size"
    )
}

/// Restores `volume`'s origin LV in place from its snapshot LV. `before` is called with each
/// LVM step's name before it runs (to journal it, or to stop there in crash tests). Thin: the
/// origin is replaced by a new thin LV made from the snapshot (metadata only). Thick: the
/// snapshot is merged into the origin and taken again (costs the changed data).
pub fn restore_in_place(
    lvm: &Lvm,
    volume: &VolumeRecord,
    mut before: impl FnMut(&'static str) -> ControlFlow<()>,
) -> Result<(), String> {
    let Some(l) = volume.lvm() else { return Ok(()) };
    let done = if l.thin {
        lvm.restore_thin_with(&l.vg, &l.origin, &l.snapshot, |s: ThinRestoreStep| {
            before(s.name())
        })
        .map(|_| ())
    } else {
        lvm.restore_thick_with(&l.vg, &l.origin, &l.snapshot, |s: ThickRestoreStep| {
            before(s.name())
        })
        .map(|_| ())
    };
    done.map_err(|e| format!("disk {}: {e}", volume.target))
}

/// Finishes the in-place restore of `volume` a previous vmsnapd left after beginning step
/// `last_step` (None: no step begun). Idempotent.
pub fn finish_in_place(
    lvm: &Lvm,
    volume: &VolumeRecord,
    last_step: Option<&str>,
) -> Result<(), String> {
    let Some(l) = volume.lvm() else { return Ok(()) };
    let fail = |e: vmsnap_lvm::Error| format!("disk {}: {e}", volume.target);
    match last_step {
        Some(STEP_DONE) => Ok(()),
        None => restore_in_place(lvm, volume, |_| ControlFlow::Continue(())),
        Some(step) if l.thin => {
            // The LVs alone tell where a thin restore stands; rolled back (it had not swapped
            // the names yet) means it is to be done again.
            let settled = lvm.recover_thin_restore(&l.vg, &l.origin).map_err(fail)?;
            let begun_swap = step != ThinRestoreStep::CreateNew.name();
            match settled {
                vmsnap_lvm::ThinRecovery::RolledForward => Ok(()),
                vmsnap_lvm::ThinRecovery::Nothing if begun_swap => Ok(()),
                _ => restore_in_place(lvm, volume, |_| ControlFlow::Continue(())),
            }
        }
        Some(step) => {
            // Thick: the journal says which step was begun. Before the merge started, the
            // snapshot is there and not merging: merge now. From the merge on, LVM finishes
            // the merge and the snapshot is taken again if missing.
            let snap = lvm.find_lv(&l.vg, &l.snapshot).map_err(fail)?;
            let merge_begun = step == ThickRestoreStep::Merge.name();
            match snap {
                Some(s) if merge_begun && !s.is_merging() => {
                    restore_in_place(lvm, volume, |_| ControlFlow::Continue(()))
                }
                _ => lvm
                    .recover_thick_restore(&l.vg, &l.origin, &l.snapshot, l.cow_size, &l.tags)
                    .map(|_| ())
                    .map_err(fail),
            }
        }
    }
}

/// A new LV for a VM restored as a new VM: a writable thin snapshot `name` of the snapshot LV,
/// tagged `vmsnap-restore-<restore UUID>` until the restore finishes. Thick snapshots cannot
/// be cloned this cheaply and are refused by [`check_new_vm`].
pub fn clone_thin(
    lvm: &Lvm,
    volume: &VolumeRecord,
    name: &str,
    restore_uuid: &str,
) -> Result<String, String> {
    let Some(l) = volume.lvm() else {
        return Err(format!("disk {} is not on LVM", volume.target));
    };
    lvm.snapshot_thin(&l.vg, &l.snapshot, name, &[restore_tag(restore_uuid)])
        .map_err(|e| format!("disk {}: {e}", volume.target))?;
    Ok(format!("/dev/{}/{name}", l.vg))
}

/// The tag a new VM's cloned LVs carry until its restore finishes.
pub fn restore_tag(restore_uuid: &str) -> String {
    format!("vmsnap-restore-{restore_uuid}")
}

/// The LV at `path` if it carries `restore_uuid`'s tag (a clone that restore made).
fn own_clone(
    lvm: &Lvm,
    path: &str,
    restore_uuid: &str,
) -> Result<Option<(String, String)>, String> {
    let Some((vg, lv)) = vmsnap_lvm::resolve_device(Path::new(path)) else {
        return Ok(None);
    };
    let found = lvm.find_lv(&vg, &lv).map_err(|e| e.to_string())?;
    Ok(found
        .is_some_and(|f| f.tags.contains(&restore_tag(restore_uuid)))
        .then_some((vg, lv)))
}

/// Removes the LV at `path` if it is a clone `restore_uuid` made.
pub fn remove_clone(lvm: &Lvm, path: &str, restore_uuid: &str) -> Result<(), String> {
    if let Some((vg, lv)) = own_clone(lvm, path, restore_uuid)? {
        lvm.remove(&vg, &lv).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Drops the restore tag from a new VM's cloned LV once the restore is done.
pub fn keep_clone(lvm: &Lvm, path: &str, restore_uuid: &str) -> Result<(), String> {
    if let Some((vg, lv)) = own_clone(lvm, path, restore_uuid)? {
        lvm.change_tags(&vg, &lv, &[], &[restore_tag(restore_uuid)])
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A restore as a new VM needs a thin snapshot for every LVM volume.
pub fn check_new_vm(volumes: &[VolumeRecord]) -> Result<(), String> {
    match volumes.iter().find(|v| v.lvm().is_some_and(|l| !l.thin)) {
        Some(v) => Err(format!(
            "disk {} is a thick LVM snapshot: restoring it as a new VM would copy the whole volume, which vmsnap does not do; restore it in place, or copy {} yourself",
            v.target, v.image
        )),
        None => Ok(()),
    }
}

/// LVM logical volumes: thin snapshots of thin LVs, copy-on-write snapshots of thick ones.
pub struct LvmBackend;

impl VolumeBackend for LvmBackend {
    fn name(&self) -> &'static str {
        "lvm"
    }

    fn takes(&self, disk: &DiskInfo) -> bool {
        disk.backend == DiskBackend::Lvm.as_str()
    }

    fn owns(&self, volume: &VolumeRecord) -> bool {
        volume.lvm().is_some()
    }

    fn plan(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        _live_xml: &str,
        disk: &DiskInfo,
    ) -> OpResult<VolumeRecord> {
        plan(
            &env.ctx.lvm_tool(),
            &env.ctx.lvm,
            &disk.target,
            &disk.source,
            &snapshot.vm_uuid,
            &snapshot.uuid,
        )
        .map_err(OpError::Refused)
    }

    fn capture(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volumes: &[VolumeRecord],
        _disks: &[DiskInfo],
    ) -> OpResult<()> {
        take(&env.ctx.lvm_tool(), &snapshot.uuid, volumes).storage()
    }

    fn is_captured(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<bool> {
        is_taken(&env.ctx.lvm_tool(), &snapshot.uuid, volume).storage()
    }

    fn undo(&self, env: &Env, snapshot: &SnapshotRecord, volumes: &[VolumeRecord]) {
        discard(&env.ctx.lvm_tool(), &snapshot.uuid, volumes);
    }

    fn discard(&self, env: &Env, snapshot: &SnapshotRecord, volumes: &[VolumeRecord]) {
        discard(&env.ctx.lvm_tool(), &snapshot.uuid, volumes);
    }

    fn check_intact(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<()> {
        check_restorable(&env.ctx.lvm_tool(), &snapshot.uuid, volume).map_err(OpError::Refused)
    }

    fn release(
        &self,
        env: &Env,
        deleting: &mut SnapshotRecord,
        _others: &mut [Arc<SnapshotRecord>],
        volume: &VolumeRecord,
        _deadline: std::time::Instant,
    ) -> OpResult<()> {
        env.ctx.progress(
            deleting,
            format!("removing the snapshot LV of disk {}", volume.target),
        );
        remove(&env.ctx.lvm_tool(), &deleting.uuid, volume).storage()
    }

    /// In place, the origin LV itself gets the snapshot's data; a new VM gets a thin clone.
    fn plan_restore(
        &self,
        restore: &RestoreRecord,
        volume: &VolumeRecord,
    ) -> OpResult<VolumeRestore> {
        let Some(l) = volume.lvm() else {
            return Err(OpError::Refused(format!(
                "disk {} is not on LVM",
                volume.target
            )));
        };
        let to_image = if restore.new_vm {
            let short = restore.uuid.get(..8).unwrap_or(&restore.uuid);
            let name = format!("{}-{}-r{short}", restore.target_name, volume.target);
            vmsnap_lvm::validate_lv_name(&name).map_err(|e| OpError::Refused(e.to_string()))?;
            format!("/dev/{}/{name}", l.vg)
        } else {
            format!("/dev/{}/{}", l.vg, l.origin)
        };
        Ok(VolumeRestore {
            target: volume.target.clone(),
            from_image: volume.image.clone(),
            to_image,
        })
    }

    fn check_restore_target(&self, env: &Env, new_vm: bool, volume: &VolumeRecord) -> OpResult<()> {
        if new_vm {
            check_new_vm(std::slice::from_ref(volume)).map_err(OpError::Refused)
        } else {
            check_in_place(&env.ctx.lvm_tool(), volume).map_err(OpError::Refused)
        }
    }

    fn stage_restore(
        &self,
        env: &Env,
        restore: &RestoreRecord,
        volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> OpResult<()> {
        if !restore.new_vm {
            return Ok(());
        }
        let name = planned.to_image.rsplit('/').next().unwrap_or_default();
        clone_thin(&env.ctx.lvm_tool(), volume, name, &restore.uuid)
            .map(|_| ())
            .storage()
    }

    fn restores_in_place(&self, _volume: &VolumeRecord) -> bool {
        true
    }

    fn restore_in_place(
        &self,
        env: &Env,
        volume: &VolumeRecord,
        before: &mut BeforeStep,
    ) -> OpResult<()> {
        let mut journal_error = None;
        let done = restore_in_place(&env.ctx.lvm_tool(), volume, |step| match before(step) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                journal_error = Some(e);
                ControlFlow::Break(())
            }
        });
        if let Some(e) = journal_error {
            return Err(e);
        }
        done.storage()
    }

    fn finish_in_place(
        &self,
        env: &Env,
        volume: &VolumeRecord,
        last_step: Option<&str>,
    ) -> OpResult<()> {
        finish_in_place(&env.ctx.lvm_tool(), volume, last_step).storage()
    }

    fn restored_source(
        &self,
        new_vm: bool,
        _volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> Option<(String, &'static str)> {
        new_vm.then(|| (planned.to_image.clone(), "raw"))
    }

    fn keep_restored(
        &self,
        env: &Env,
        restore: &RestoreRecord,
        planned: &VolumeRestore,
    ) -> OpResult<()> {
        if !restore.new_vm {
            return Ok(());
        }
        keep_clone(&env.ctx.lvm_tool(), &planned.to_image, &restore.uuid).storage()
    }

    /// Only a new VM's clones, which carry this restore's tag; an origin LV never.
    fn discard_restored(
        &self,
        env: &Env,
        restore: &RestoreRecord,
        _volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) {
        if !restore.new_vm {
            return;
        }
        if let Err(e) = remove_clone(&env.ctx.lvm_tool(), &planned.to_image, &restore.uuid) {
            tracing::warn!(lv = %planned.to_image, error = %e, "cannot remove a restore's LV");
        }
    }
}

/// One thick snapshot LV's state, for the fill monitor.
#[derive(Debug, Clone, PartialEq)]
pub struct CowFill {
    pub snapshot_uuid: String,
    pub vg: String,
    pub lv: String,
    pub percent: f64,
    pub invalid: bool,
}

/// The fill of every vmsnap thick snapshot LV (one `lvs @vmsnap`).
pub fn scan_fill(lvm: &Lvm) -> Result<Vec<CowFill>, String> {
    let lvs = lvm
        .lvs_tagged(vmsnap_lvm::TAG_VMSNAP)
        .map_err(|e| e.to_string())?;
    Ok(lvs
        .into_iter()
        .filter(|lv| lv.is_thick_snapshot())
        .filter_map(|lv| {
            let uuid = lv
                .tags
                .iter()
                .find_map(|t| t.strip_prefix("vmsnap-snap-"))?
                .to_string();
            Some(CowFill {
                snapshot_uuid: uuid,
                percent: lv.fill_percent().unwrap_or(0.0),
                invalid: lv.is_invalid(),
                vg: lv.vg,
                lv: lv.name,
            })
        })
        .collect())
}
