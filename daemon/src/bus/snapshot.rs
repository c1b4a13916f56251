use tokio::sync::mpsc;
use vmsnap_api::{ExcludedVolume, IncludedVolume, VmSnapError};
use zbus::interface;
use zbus::object_server::SignalEmitter;

use super::ask;
use super::auth::{Authorizer, ACTION_DELETE};
use crate::engine::Request;
use crate::store::SnapshotRecord;

/// `org.vmsnap.VmSnap1.Snapshot`: one per snapshot, mirroring KubeVirt's
/// VirtualMachineSnapshot status.
pub struct SnapshotObject {
    record: SnapshotRecord,
    progress: String,
    engine: mpsc::Sender<Request>,
    auth: Authorizer,
}

impl SnapshotObject {
    pub fn new(record: SnapshotRecord, engine: mpsc::Sender<Request>, auth: Authorizer) -> Self {
        SnapshotObject {
            record,
            progress: String::new(),
            engine,
            auth,
        }
    }

    /// Takes the new record and announces each property that changed.
    pub(super) async fn update(
        &mut self,
        record: SnapshotRecord,
        emitter: &SignalEmitter<'_>,
    ) -> zbus::Result<()> {
        let old = std::mem::replace(&mut self.record, record);
        let new = &self.record;
        if old.indications != new.indications {
            self.indications_changed(emitter).await?;
        }
        if old.source_indications != new.source_indications {
            self.source_indications_changed(emitter).await?;
        }
        if old.volumes != new.volumes {
            self.included_volumes_changed(emitter).await?;
        }
        if old.excluded != new.excluded {
            self.excluded_volumes_changed(emitter).await?;
        }
        if old.error != new.error {
            self.error_changed(emitter).await?;
        }
        if old.error_name != new.error_name {
            self.error_name_changed(emitter).await?;
        }
        if old.freeze_duration_ms != new.freeze_duration_ms {
            self.freeze_duration_ms_changed(emitter).await?;
        }
        if old.frozen_filesystems != new.frozen_filesystems {
            self.frozen_filesystems_changed(emitter).await?;
        }
        if old.ready_to_use != new.ready_to_use {
            self.ready_to_use_changed(emitter).await?;
        }
        if old.cow_fill_percent != new.cow_fill_percent {
            self.cow_fill_percent_changed(emitter).await?;
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

#[interface(name = "org.vmsnap.VmSnap1.Snapshot")]
impl SnapshotObject {
    /// Deletes the snapshot without changing any other snapshot or the live disk. Returns at
    /// once; the object goes to phase Deleting and disappears when done.
    async fn delete(
        &self,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &zbus::Connection,
    ) -> Result<(), VmSnapError> {
        self.auth.check(connection, &header, ACTION_DELETE).await?;
        let uuid = self.record.uuid.clone();
        ask(&self.engine, |reply| Request::DeleteSnapshot {
            uuid,
            reply,
        })
        .await??;
        Ok(())
    }

    /// The content record's definition: the VM's inactive domain XML as recorded with the
    /// snapshot (what a restore brings back); empty until recorded. Together with
    /// IncludedVolumes (one image or logical volume per captured disk) it is KubeVirt's
    /// VirtualMachineSnapshotContent. Graphics passwords are left out: everyone may read it.
    /// A method, read from the record on disk, rather than a property: every object's
    /// definition in GetManagedObjects would pass the bus's message size limit on a host with
    /// thousands of snapshots.
    async fn get_domain_xml(&self) -> Result<String, VmSnapError> {
        let uuid = self.record.uuid.clone();
        Ok(ask(&self.engine, |reply| Request::GetDomainXml { uuid, reply }).await??)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.record.name.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn description(&self) -> String {
        self.record.description.clone()
    }

    /// The VM's name when the snapshot was taken.
    #[zbus(property(emits_changed_signal = "const"))]
    fn vm_name(&self) -> String {
        self.record.vm_name.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn vm_uuid(&self) -> String {
        self.record.vm_uuid.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn uuid(&self) -> String {
        self.record.uuid.clone()
    }

    /// InProgress, Succeeded, Failed or Deleting.
    #[zbus(property)]
    fn phase(&self) -> String {
        self.record.phase.as_str().to_string()
    }

    /// Whether the snapshot is complete and can be restored.
    #[zbus(property)]
    fn ready_to_use(&self) -> bool {
        self.record.ready_to_use
    }

    /// RFC 3339, UTC.
    #[zbus(property(emits_changed_signal = "const"))]
    fn creation_time(&self) -> String {
        self.record.creation_time.clone()
    }

    /// Each indication with a message saying why: (indication, message), as KubeVirt's
    /// sourceIndications (the guest agent's error for QuiesceFailed and QuiesceTimeout, the
    /// excluded disks for PartialSnapshot).
    #[zbus(property)]
    fn source_indications(&self) -> Vec<vmsnap_api::SourceIndication> {
        if self.record.source_indications.is_empty() {
            // A record from before messages were kept, or still in progress.
            crate::ops::create::source_indications(&self.record, &[])
        } else {
            self.record.source_indications.clone()
        }
    }

    /// Online, GuestAgent, NoGuestAgent, QuiesceFailed, QuiesceTimeout, Paused,
    /// PartialSnapshot.
    #[zbus(property)]
    fn indications(&self) -> Vec<String> {
        self.record
            .indications
            .iter()
            .map(|i| i.as_str().to_string())
            .collect()
    }

    /// Each captured disk: (target, backend, image holding the snapshot's data, virtual size).
    #[zbus(property)]
    fn included_volumes(&self) -> Vec<IncludedVolume> {
        self.record.included_volumes()
    }

    /// Each disk left out: (target, reason).
    #[zbus(property)]
    fn excluded_volumes(&self) -> Vec<ExcludedVolume> {
        self.record.excluded.clone()
    }

    /// Why the snapshot failed; empty otherwise.
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

    /// What the operation on this snapshot is doing right now; empty when idle.
    #[zbus(property)]
    fn progress(&self) -> String {
        self.progress.clone()
    }

    /// How long the guest's filesystems were frozen, in milliseconds (0 without a freeze).
    #[zbus(property)]
    fn freeze_duration_ms(&self) -> u64 {
        self.record.freeze_duration_ms
    }

    /// How many filesystems the guest agent froze.
    #[zbus(property)]
    fn frozen_filesystems(&self) -> u32 {
        self.record.frozen_filesystems
    }

    /// How full the fullest copy-on-write space of the snapshot's thick LVM volumes is, in
    /// percent (0 when it has none). At 100 the LVM snapshot is invalid and the snapshot Failed.
    #[zbus(property)]
    fn cow_fill_percent(&self) -> f64 {
        self.record.cow_fill_percent
    }
}
