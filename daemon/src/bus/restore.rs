use std::sync::Arc;

use tokio::sync::mpsc;
use vmsnap_api::{DetachedDisk, ExcludedVolume, VmSnapError, VolumeRestore};
use zbus::interface;
use zbus::object_server::SignalEmitter;

use super::ask;
use super::auth::{Authorizer, ACTION_RESTORE};
use crate::engine::Request;
use crate::store::RestoreRecord;

/// `org.vmsnap.VmSnap1.Restore`: one per restore, mirroring KubeVirt's VirtualMachineRestore
/// status.
pub struct RestoreObject {
    record: Arc<RestoreRecord>,
    progress: String,
    engine: mpsc::Sender<Request>,
    auth: Authorizer,
}

impl RestoreObject {
    pub fn new(
        record: Arc<RestoreRecord>,
        engine: mpsc::Sender<Request>,
        auth: Authorizer,
    ) -> Self {
        RestoreObject {
            record,
            progress: String::new(),
            engine,
            auth,
        }
    }

    pub(super) async fn update(
        &mut self,
        record: Arc<RestoreRecord>,
        emitter: &SignalEmitter<'_>,
    ) -> zbus::Result<()> {
        let old = std::mem::replace(&mut self.record, record);
        let new = &self.record;
        if old.target_name != new.target_name {
            self.target_changed(emitter).await?;
        }
        if old.restores != new.restores {
            self.restores_changed(emitter).await?;
        }
        if old.detached != new.detached {
            self.detached_disks_changed(emitter).await?;
        }
        if old.not_restored != new.not_restored {
            self.not_restored_changed(emitter).await?;
        }
        if old.safety_snapshot != new.safety_snapshot {
            self.safety_snapshot_changed(emitter).await?;
        }
        if old.error != new.error {
            self.error_changed(emitter).await?;
        }
        if old.error_name != new.error_name {
            self.error_name_changed(emitter).await?;
        }
        if old.restore_time != new.restore_time {
            self.restore_time_changed(emitter).await?;
        }
        if old.complete != new.complete {
            self.complete_changed(emitter).await?;
        }
        // Last, so a client that waits for the phase sees everything else already.
        if old.phase != new.phase {
            self.phase_changed(emitter).await?;
        }
        Ok(())
    }

    pub(super) async fn set_progress(
        &mut self,
        text: String,
        emitter: &SignalEmitter<'_>,
    ) -> zbus::Result<()> {
        if self.progress != text {
            self.progress = text;
            self.progress_changed(emitter).await?;
        }
        Ok(())
    }
}

#[interface(name = "org.vmsnap.VmSnap1.Restore")]
impl RestoreObject {
    /// Deletes the record of a finished restore (Succeeded or Failed); the restored VM, its
    /// disks and the safety snapshot stay. A restore still waiting for its VM to be shut off
    /// is cancelled (nothing has changed) and then removed. Authorized as a restore. The
    /// object disappears.
    async fn delete(
        &self,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &zbus::Connection,
    ) -> Result<(), VmSnapError> {
        self.auth.check(connection, &header, ACTION_RESTORE).await?;
        let uuid = self.record.uuid.clone();
        ask(&self.engine, |reply| Request::DeleteRestore { uuid, reply }).await??;
        Ok(())
    }

    /// The name the restore was asked under (a VirtualMachineRestore's metadata.name); empty
    /// when it has none.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.record.name.clone()
    }

    /// The targetReadinessPolicy it was asked with; empty when none.
    #[zbus(property(emits_changed_signal = "const"))]
    fn readiness_policy(&self) -> String {
        self.record.readiness_policy.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn uuid(&self) -> String {
        self.record.uuid.clone()
    }

    /// The VM the snapshot belongs to.
    #[zbus(property(emits_changed_signal = "const"))]
    fn vm_name(&self) -> String {
        self.record.vm_name.clone()
    }

    /// The snapshot's name.
    #[zbus(property(emits_changed_signal = "const"))]
    fn snapshot(&self) -> String {
        self.record.snapshot_name.clone()
    }

    /// The VM restored: the same VM (in place) or the new one.
    #[zbus(property)]
    fn target(&self) -> String {
        self.record.target_name.clone()
    }

    /// Whether the restore creates a new VM.
    #[zbus(property(emits_changed_signal = "const"))]
    fn new_vm(&self) -> bool {
        self.record.new_vm
    }

    /// InProgress, Waiting (for the VM to be shut off), Succeeded or Failed.
    #[zbus(property)]
    fn phase(&self) -> String {
        self.record.phase.as_str().to_string()
    }

    #[zbus(property)]
    fn complete(&self) -> bool {
        self.record.complete
    }

    /// RFC 3339, UTC; when the restore was requested.
    #[zbus(property(emits_changed_signal = "const"))]
    fn creation_time(&self) -> String {
        self.record.creation_time.clone()
    }

    /// RFC 3339, UTC; when it completed, empty before.
    #[zbus(property)]
    fn restore_time(&self) -> String {
        self.record.restore_time.clone()
    }

    /// Per disk: (target, from image, to image).
    #[zbus(property)]
    fn restores(&self) -> Vec<VolumeRestore> {
        self.record.restores.clone()
    }

    /// Disks attached after the snapshot, detached by the restore: (target, source).
    #[zbus(property)]
    fn detached_disks(&self) -> Vec<DetachedDisk> {
        self.record.detached.clone()
    }

    /// Disks the snapshot left out: in the definition again, content not restored.
    #[zbus(property)]
    fn not_restored(&self) -> Vec<ExcludedVolume> {
        self.record.not_restored.clone()
    }

    /// The snapshot of the state before an in-place restore; empty if none.
    #[zbus(property)]
    fn safety_snapshot(&self) -> String {
        self.record.safety_snapshot.clone()
    }

    #[zbus(property)]
    fn error(&self) -> String {
        self.record.error.clone()
    }

    /// The D-Bus error name of Error, so that clients tell failures apart without reading
    /// the message: org.vmsnap.VmSnap1.Error.StorageFailed (an image, a logical volume, a
    /// state file), DeadlineExceeded, LibvirtUnavailable, LibvirtError, RecordWriteFailed,
    /// NotFound (the VM is gone) or Failed (refused as things are); empty without an error.
    #[zbus(property)]
    fn error_name(&self) -> String {
        self.record.error_name.clone()
    }

    /// What the restore is doing right now; empty when idle.
    #[zbus(property)]
    fn progress(&self) -> String {
        self.progress.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use vmsnap_api::RESTORE_INTERFACE;
    use zbus::as_variant::to_owned_variant;
    use zbus::OwnedVariant;

    use super::super::listing::{Listed, Objects, RestoreEntry};
    use super::super::snapshot::tests::decoded;
    use super::*;
    use crate::store::{RestoreStep, RECORD_VERSION};

    #[test]
    fn a_listing_serves_what_the_object_serves() {
        let (engine, _requests) = mpsc::channel(1);
        let record = Arc::new(RestoreRecord {
            version: RECORD_VERSION,
            uuid: "restore-r".into(),
            vm_name: "a".into(),
            vm_uuid: "vm-a".into(),
            snapshot_name: "s".into(),
            snapshot_uuid: "uuid-s".into(),
            target_name: "b".into(),
            target_uuid: "vm-b".into(),
            new_vm: true,
            stop_target: false,
            start: false,
            take_safety_snapshot: true,
            phase: vmsnap_api::RestorePhase::Failed,
            complete: false,
            creation_time: "2026-11-26T15:00:00Z".into(),
            restore_time: "2026-11-26T15:00:01Z".into(),
            restores: vec![VolumeRestore {
                target: "vda".into(),
                from_image: "/i/a.qcow2".into(),
                to_image: "/i/c.qcow2".into(),
            }],
            detached: vec![DetachedDisk {
                target: "vdb".into(),
                source: "/i/x.qcow2".into(),
            }],
            not_restored: vec![ExcludedVolume {
                target: "sda".into(),
                reason: "cdrom".into(),
            }],
            safety_snapshot: "pre-restore-1".into(),
            error: "no".into(),
            step: RestoreStep::Planned,
            name: "my-restore".into(),
            readiness_policy: "StopTarget".into(),
            error_name: "org.vmsnap.VmSnap1.Error.Failed".into(),
        });
        let mut object = RestoreObject::new(record.clone(), engine, Authorizer::Disabled);
        object.progress = "defining".into();
        let v = |r: zbus::Result<OwnedVariant>| r.expect("a variant");
        let served: HashMap<String, OwnedVariant> = HashMap::from([
            ("Name".to_string(), v(to_owned_variant(&object.name()))),
            (
                "ReadinessPolicy".into(),
                v(to_owned_variant(&object.readiness_policy())),
            ),
            ("Uuid".into(), v(to_owned_variant(&object.uuid()))),
            ("VmName".into(), v(to_owned_variant(&object.vm_name()))),
            ("Snapshot".into(), v(to_owned_variant(&object.snapshot()))),
            ("Target".into(), v(to_owned_variant(&object.target()))),
            ("NewVm".into(), v(to_owned_variant(&object.new_vm()))),
            ("Phase".into(), v(to_owned_variant(&object.phase()))),
            ("Complete".into(), v(to_owned_variant(&object.complete()))),
            (
                "CreationTime".into(),
                v(to_owned_variant(&object.creation_time())),
            ),
            (
                "RestoreTime".into(),
                v(to_owned_variant(&object.restore_time())),
            ),
            ("Restores".into(), v(to_owned_variant(&object.restores()))),
            (
                "DetachedDisks".into(),
                v(to_owned_variant(&object.detached_disks())),
            ),
            (
                "NotRestored".into(),
                v(to_owned_variant(&object.not_restored())),
            ),
            (
                "SafetySnapshot".into(),
                v(to_owned_variant(&object.safety_snapshot())),
            ),
            ("Error".into(), v(to_owned_variant(&object.error()))),
            (
                "ErrorName".into(),
                v(to_owned_variant(&object.error_name())),
            ),
            ("Progress".into(), v(to_owned_variant(&object.progress()))),
        ]);
        let entry = RestoreEntry {
            record: record.clone(),
            progress: Arc::from("defining"),
        };
        let mut listing = decoded(&Objects(vec![Listed::Restore(entry)]));
        let path =
            zbus::OwnedObjectPath::try_from(vmsnap_api::restore_path(&record.uuid)).expect("path");
        let mut interfaces = listing.remove(&path).expect("listed");
        let interface =
            zbus::names::InterfaceName::from_static_str(RESTORE_INTERFACE).expect("a name");
        assert_eq!(
            interfaces.remove(&interface).expect("its interface"),
            served
        );
    }
}
