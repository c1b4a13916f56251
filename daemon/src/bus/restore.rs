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
    record: RestoreRecord,
    progress: String,
    engine: mpsc::Sender<Request>,
    auth: Authorizer,
}

impl RestoreObject {
    pub fn new(record: RestoreRecord, engine: mpsc::Sender<Request>, auth: Authorizer) -> Self {
        RestoreObject {
            record,
            progress: String::new(),
            engine,
            auth,
        }
    }

    pub(super) async fn update(
        &mut self,
        record: RestoreRecord,
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
