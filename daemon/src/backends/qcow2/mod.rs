//! The qcow2 backend: disks on qcow2 (or raw) files, captured by external qcow2 overlays.
//!
//! How the images relate: taking snapshot S of a disk whose top image is I creates a new overlay
//! O on top of I; the VM writes to O from then on, and I, now read-only, is S's image. So the
//! images of a VM's snapshots and the live disk form one backing chain, oldest first. Deleting S
//! merges the image directly above I (S's overlay) down into I: the merge costs only the data
//! written between S and the next snapshot (or now), and every other snapshot keeps its content.
//! A restore never writes a snapshot's image: the restored disk is a new overlay on it.

pub mod chain;
pub mod forest;
pub mod header;
mod index;
mod merge;
pub mod overlay;
pub mod qemu_img;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;
use virt::connect::Connect;
use vmsnap_api::{DiskBackend, DiskInfo, VolumeRestore};

use super::{Env, VolumeBackend};
use crate::domain;
use crate::files;
use crate::ops::{OpError, OpResult};
use crate::store::{Artifact, RestoreRecord, SnapshotRecord, VolumeRecord};

/// REUSE_EXT: the overlays are made before the freeze, so creating them is not part of the
/// frozen window.
const SNAPSHOT_FLAGS: u32 = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT;

pub struct Qcow2Backend;

fn connection<'a>(env: &'a Env) -> OpResult<&'a Connect> {
    env.host
        .libvirt()
        .ok_or_else(|| OpError::Refused("qcow2 volumes need a libvirt host".to_string()))
}

/// What the forest reads the host's disks from: the inventory the libvirt thread keeps, when
/// the host has one, and the operation's own connection.
fn host_view<'a>(env: &'a Env) -> OpResult<forest::HostView<'a>> {
    Ok(forest::HostView {
        conn: connection(env)?,
        inventory: Box::new(|| env.host.known_domains()),
        own_vm: Some(env.ctx.vm_uuid().to_ascii_lowercase()),
    })
}

/// The forest `check_release` scanned around a volume's image, for its `release` right after
/// (nothing changes in between: the delete's check and its steps share one session).
struct CheckedForest {
    image: String,
    forest: forest::Forest,
}

/// The overlay a volume's snapshot created.
fn overlay(volume: &VolumeRecord) -> &str {
    match &volume.artifact {
        Artifact::Qcow2 { overlay, .. } => overlay,
        _ => "",
    }
}

fn image_format(volume: &VolumeRecord) -> &str {
    match &volume.artifact {
        Artifact::Qcow2 { image_format, .. } => image_format,
        _ => "",
    }
}

impl VolumeBackend for Qcow2Backend {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn takes(&self, disk: &DiskInfo) -> bool {
        disk.backend == DiskBackend::Qcow2.as_str()
    }

    fn owns(&self, volume: &VolumeRecord) -> bool {
        matches!(volume.artifact, Artifact::Qcow2 { .. })
    }

    fn plan(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        live_xml: &str,
        disk: &DiskInfo,
    ) -> OpResult<VolumeRecord> {
        let (image, format) = domain::disk_source(live_xml, &disk.target)?;
        if !env.host.is_active(&snapshot.vm_uuid)? {
            qemu_img::check_not_in_use(&image)
                .map_err(|e| OpError::Refused(format!("disk {}: {e}", disk.target)))?;
        }
        let dir = Path::new(&image).parent().ok_or_else(|| {
            OpError::Refused(format!("disk {}: {image} has no directory", disk.target))
        })?;
        let short = snapshot.uuid.get(..8).unwrap_or(&snapshot.uuid);
        let overlay = dir
            .join(format!(
                "{}-{}-{short}.qcow2",
                snapshot.vm_name, disk.target
            ))
            .to_string_lossy()
            .into_owned();
        if files::path_taken(Path::new(&overlay)) {
            return Err(OpError::Refused(format!(
                "disk {}: {overlay} already exists",
                disk.target
            )));
        }
        let virtual_size = env.host.disk_capacity(&snapshot.vm_uuid, &disk.target)?;
        Ok(VolumeRecord {
            target: disk.target.clone(),
            image,
            virtual_size,
            artifact: Artifact::Qcow2 {
                image_format: format,
                overlay,
            },
        })
    }

    /// The overlays, made before the freeze so that the frozen window holds only the snapshot
    /// call (REUSE_EXT).
    fn prepare(
        &self,
        _env: &Env,
        _snapshot: &SnapshotRecord,
        volumes: &[VolumeRecord],
    ) -> OpResult<()> {
        for volume in volumes {
            overlay::create(
                overlay(volume),
                &volume.image,
                image_format(volume),
                volume.virtual_size,
            )
            // The error says what failed on which overlay; only the disk is added here.
            .map_err(|e| OpError::Storage(format!("disk {}: {e}", volume.target)))?;
        }
        Ok(())
    }

    fn capture(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volumes: &[VolumeRecord],
        disks: &[DiskInfo],
    ) -> OpResult<()> {
        let dom = merge::lookup(connection(env)?, &snapshot.vm_uuid)?;
        let xml = snapshot_xml(snapshot, volumes, disks);
        dom.create_snapshot_xml(&xml, SNAPSHOT_FLAGS)
            .map(|_| ())
            .map_err(|e| {
                OpError::Libvirt(format!(
                    "libvirt could not snapshot the disks: {}",
                    e.message()
                ))
            })
    }

    fn is_captured(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<bool> {
        let xml = env.host.current_definition(&snapshot.vm_uuid)?;
        let (top, _) = domain::disk_source(&xml, &volume.target)?;
        let chain = chain::backing_chain_or_qemu_img(&top)?;
        Ok(chain.iter().any(|i| i.path == overlay(volume)))
    }

    /// Merges each overlay in use back into its image, then removes it.
    fn undo(&self, env: &Env, snapshot: &SnapshotRecord, volumes: &[VolumeRecord]) {
        let dom = match connection(env).and_then(|c| Ok(merge::lookup(c, &snapshot.vm_uuid)?)) {
            Ok(dom) => dom,
            Err(e) => {
                warn!(error = %e, "cannot roll back the overlays");
                return;
            }
        };
        for volume in volumes {
            let deadline = Instant::now() + env.ctx.failure_deadline;
            if let Err(e) = merge::merge(
                env.ctx,
                &dom,
                snapshot,
                volume,
                &volume.image,
                overlay(volume),
                deadline,
            ) {
                warn!(disk = %volume.target, error = %e, "could not roll back an overlay");
            }
            merge::discard_overlay(&dom, overlay(volume));
        }
    }

    fn discard(&self, env: &Env, snapshot: &SnapshotRecord, volumes: &[VolumeRecord]) {
        let Ok(conn) = connection(env) else { return };
        let Ok(dom) = merge::lookup(conn, &snapshot.vm_uuid) else {
            return;
        };
        for volume in volumes {
            if Path::new(overlay(volume)).exists() {
                merge::discard_overlay(&dom, overlay(volume));
            }
        }
    }

    fn check_intact(
        &self,
        _env: &Env,
        snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<()> {
        if !Path::new(&volume.image).exists() {
            return Err(OpError::Refused(format!(
                "snapshot '{}' cannot be restored: its image {} of disk {} is missing",
                snapshot.name, volume.image, volume.target
            )));
        }
        // The image needs its own backing files too: each one there, none a loop. Read from the
        // headers; staging the restore opens the whole chain with qemu-img anyway, which finds
        // any damage past the headers before anything changes.
        chain::backing_chain_or_qemu_img(&volume.image).map_err(|_| {
            OpError::Refused(format!(
                "snapshot '{}' cannot be restored: the backing chain of its image {} of disk {} \
                 cannot be read (a backing file is missing or damaged; see vmsnapd's journal)",
                snapshot.name, volume.image, volume.target
            ))
        })?;
        Ok(())
    }

    fn release(
        &self,
        env: &Env,
        deleting: &mut SnapshotRecord,
        others: &mut [Arc<SnapshotRecord>],
        volume: &VolumeRecord,
        deadline: Instant,
    ) -> OpResult<()> {
        env.ctx
            .progress(deleting, format!("releasing disk {}", volume.target));
        let checked = env
            .take_finding::<CheckedForest>()
            .filter(|checked| checked.image == volume.image)
            .map(|checked| checked.forest);
        merge::release_image(
            env.ctx,
            &host_view(env)?,
            deleting,
            others,
            &volume.target,
            &volume.image,
            checked,
            deadline,
        )
    }

    fn check_release(
        &self,
        env: &Env,
        deleting: &SnapshotRecord,
        others: &[Arc<SnapshotRecord>],
        volume: &VolumeRecord,
    ) -> OpResult<()> {
        let forest = merge::check_room(&host_view(env)?, deleting, others, &volume.image)?;
        env.keep_finding(CheckedForest {
            image: volume.image.clone(),
            forest,
        });
        Ok(())
    }

    fn plan_restore(
        &self,
        restore: &RestoreRecord,
        volume: &VolumeRecord,
    ) -> OpResult<VolumeRestore> {
        let short = restore.uuid.get(..8).unwrap_or(&restore.uuid);
        let to_image = Path::new(&volume.image)
            .parent()
            .unwrap_or(Path::new("/"))
            .join(format!(
                "{}-{}-r{short}.qcow2",
                restore.target_name, volume.target
            ))
            .to_string_lossy()
            .into_owned();
        Ok(VolumeRestore {
            target: volume.target.clone(),
            from_image: volume.image.clone(),
            to_image,
        })
    }

    fn check_restore_target(
        &self,
        _env: &Env,
        _new_vm: bool,
        _volume: &VolumeRecord,
    ) -> OpResult<()> {
        Ok(())
    }

    /// A new overlay on the snapshot's image: the snapshot's image is never written.
    fn stage_restore(
        &self,
        _env: &Env,
        _restore: &RestoreRecord,
        volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> OpResult<()> {
        Ok(qemu_img::create_overlay(
            &planned.to_image,
            &volume.image,
            image_format(volume),
        )?)
    }

    fn restored_source(
        &self,
        _new_vm: bool,
        _volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> Option<(String, &'static str)> {
        Some((planned.to_image.clone(), "qcow2"))
    }

    fn discard_restored(
        &self,
        _env: &Env,
        _restore: &RestoreRecord,
        _volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) {
        let _ = std::fs::remove_file(&planned.to_image);
    }

    /// The images the VM used before are the old branch: what a snapshot claims stays, what
    /// nothing needs goes.
    fn release_replaced(
        &self,
        env: &Env,
        source: &str,
        records: &[Arc<SnapshotRecord>],
    ) -> OpResult<()> {
        Ok(forest::prune_unclaimed(&host_view(env)?, records, source)?)
    }
}

fn snapshot_xml(record: &SnapshotRecord, volumes: &[VolumeRecord], disks: &[DiskInfo]) -> String {
    let mut xml = format!("<domainsnapshot><name>vmsnap-{}</name><disks>", record.uuid);
    for disk in disks {
        match volumes.iter().find(|v| v.target == disk.target) {
            Some(v) => xml.push_str(&format!(
                "<disk name='{}' snapshot='external' type='file'><driver type='qcow2'/><source file='{}'/></disk>",
                xml_escape(&v.target),
                xml_escape(overlay(v))
            )),
            None => xml.push_str(&format!(
                "<disk name='{}' snapshot='no'/>",
                xml_escape(&disk.target)
            )),
        }
    }
    xml.push_str("</disks></domainsnapshot>");
    xml
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// Test helpers the backend's modules share.
#[cfg(test)]
pub(crate) mod testing {
    /// Runs qemu-img; the test fails when it does.
    pub fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs");
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    /// Makes a 1 MiB qcow2 image at `path`, on `backing` (a qcow2 image) if given.
    pub fn qcow2_image(path: &str, backing: Option<&str>) {
        match backing {
            Some(b) => qemu_img(&[
                "create", "-q", "-f", "qcow2", "-u", "-b", b, "-F", "qcow2", path, "1M",
            ]),
            None => qemu_img(&["create", "-q", "-f", "qcow2", path, "1M"]),
        }
    }
}
