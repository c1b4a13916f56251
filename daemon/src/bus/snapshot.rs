use std::borrow::Cow;
use std::sync::Arc;

use tokio::sync::mpsc;
use vmsnap_api::{snapshot_path, ExcludedVolume, IncludedVolume, SourceIndication, VmSnapError};
use zbus::interface;
use zbus::object_server::{Fallback, FallbackObject, SignalEmitter};
use zbus::ObjectPath;

use super::ask;
use super::auth::{Authorizer, ACTION_DELETE};
use super::listing::{self, SharedRegistry, SnapshotEntry};
use crate::engine::Request;
use crate::store::SnapshotRecord;

/// `org.vmsnap.VmSnap1.Snapshot`: one per snapshot, mirroring KubeVirt's
/// VirtualMachineSnapshot status.
///
/// Not registered in zbus's object tree: [`SnapshotFallback`] makes one from the registry's
/// entry for each call to a snapshot's path, and the publisher one for each change it
/// announces (issue 13: a zbus node per snapshot cost about 1.2 KB).
pub struct SnapshotObject {
    record: Arc<SnapshotRecord>,
    progress: Arc<str>,
    engine: mpsc::Sender<Request>,
    auth: Authorizer,
}

impl SnapshotObject {
    /// The object of a snapshot as the registry holds it.
    pub fn new(entry: &SnapshotEntry, engine: mpsc::Sender<Request>, auth: Authorizer) -> Self {
        SnapshotObject {
            record: entry.record.clone(),
            progress: entry.progress.clone(),
            engine,
            auth,
        }
    }

    /// Takes the new record and announces each property that changed.
    pub(super) async fn update(
        &mut self,
        record: Arc<SnapshotRecord>,
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
        text: Arc<str>,
        emitter: &SignalEmitter<'_>,
    ) -> zbus::Result<()> {
        if self.progress != text {
            self.progress = text;
            self.progress_changed(emitter).await?;
        }
        Ok(())
    }
}

/// Serves every snapshot's object (`/org/vmsnap/VmSnap1/snapshot/<uuid with _>`) from the
/// registry, through zbus's subtree fallback (vendor/zbus/VMSNAP-PATCH.md): a call to a
/// snapshot's path gets a [`SnapshotObject`] made for it from the snapshot's entry, a path
/// of no snapshot gets UnknownObject.
pub struct SnapshotFallback {
    registry: SharedRegistry,
    engine: mpsc::Sender<Request>,
    auth: Authorizer,
}

impl SnapshotFallback {
    pub fn new(registry: SharedRegistry, engine: mpsc::Sender<Request>, auth: Authorizer) -> Self {
        SnapshotFallback {
            registry,
            engine,
            auth,
        }
    }
}

/// Where the snapshots' objects are.
pub(super) const SNAPSHOT_FOLDER: &str = "/org/vmsnap/VmSnap1/snapshot";

/// The UUID a snapshot's path element names, if it can name one: `snapshot_path` writes a
/// UUID's dashes as `_`, and records' UUIDs are checked as they are loaded (hex and dashes).
fn uuid_of(path: &str) -> Option<String> {
    let element = path.strip_prefix(SNAPSHOT_FOLDER)?.strip_prefix('/')?;
    if element.is_empty() || element.contains('/') {
        return None;
    }
    Some(element.replace('_', "-"))
}

impl Fallback for SnapshotFallback {
    fn object(&self, path: &ObjectPath<'_>) -> Option<FallbackObject> {
        let uuid = uuid_of(path.as_str())?;
        let object = {
            let registry = listing::read(&self.registry);
            let entry = registry.snapshots.get(&uuid)?;
            SnapshotObject::new(entry, self.engine.clone(), self.auth.clone())
        };
        Some(FallbackObject::new(path.clone()).with(object))
    }

    fn children(&self) -> Vec<String> {
        listing::read(&self.registry)
            .snapshots
            .iter()
            .map(|entry| {
                let path = snapshot_path(&entry.record.uuid);
                path.rsplit('/').next().unwrap_or_default().to_string()
            })
            .collect()
    }
}

/// A snapshot's SourceIndications: the record's, or for a record from before messages were
/// kept (or still in progress) made from its indications.
pub(super) fn source_indications(record: &SnapshotRecord) -> Cow<'_, [SourceIndication]> {
    if record.source_indications.is_empty() {
        Cow::Owned(crate::store::source_indications(record, &[]))
    } else {
        Cow::Borrowed(&record.source_indications)
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
        self.record.description.to_string()
    }

    /// The VM's name when the snapshot was taken.
    #[zbus(property(emits_changed_signal = "const"))]
    fn vm_name(&self) -> String {
        self.record.vm_name.to_string()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn vm_uuid(&self) -> String {
        self.record.vm_uuid.to_string()
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
        source_indications(&self.record).into_owned()
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
        self.record.excluded.to_vec()
    }

    /// Why the snapshot failed; empty otherwise.
    #[zbus(property)]
    fn error(&self) -> String {
        self.record.error.to_string()
    }

    /// The D-Bus error name of Error, so that clients tell failures apart without reading
    /// the message: org.vmsnap.VmSnap1.Error.StorageFailed (an image, a logical volume, a
    /// state file), DeadlineExceeded, LibvirtUnavailable, LibvirtError, RecordWriteFailed,
    /// NotFound (the VM is gone) or Failed (refused as things are); empty without an error.
    #[zbus(property)]
    fn error_name(&self) -> String {
        self.record.error_name.to_string()
    }

    /// What the operation on this snapshot is doing right now; empty when idle.
    #[zbus(property)]
    fn progress(&self) -> String {
        self.progress.to_string()
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

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use vmsnap_api::{Indication, SNAPSHOT_INTERFACE};
    use zbus::as_variant::to_owned_variant;
    use zbus::wire::serialized::Context;
    use zbus::wire::{to_bytes, Endian};
    use zbus::OwnedVariant;

    use super::super::listing::{Listed, Objects, SnapshotEntry};
    use super::*;

    /// What the object's own getters serve (zbus's GetAll), as a map.
    pub(in crate::bus) fn served(object: &SnapshotObject) -> HashMap<String, OwnedVariant> {
        let v = |r: zbus::Result<OwnedVariant>| r.expect("a variant");
        HashMap::from([
            ("Name".to_string(), v(to_owned_variant(&object.name()))),
            (
                "Description".into(),
                v(to_owned_variant(&object.description())),
            ),
            ("VmName".into(), v(to_owned_variant(&object.vm_name()))),
            ("VmUuid".into(), v(to_owned_variant(&object.vm_uuid()))),
            ("Uuid".into(), v(to_owned_variant(&object.uuid()))),
            ("Phase".into(), v(to_owned_variant(&object.phase()))),
            (
                "ReadyToUse".into(),
                v(to_owned_variant(&object.ready_to_use())),
            ),
            (
                "CreationTime".into(),
                v(to_owned_variant(&object.creation_time())),
            ),
            (
                "SourceIndications".into(),
                v(to_owned_variant(&object.source_indications())),
            ),
            (
                "Indications".into(),
                v(to_owned_variant(&object.indications())),
            ),
            (
                "IncludedVolumes".into(),
                v(to_owned_variant(&object.included_volumes())),
            ),
            (
                "ExcludedVolumes".into(),
                v(to_owned_variant(&object.excluded_volumes())),
            ),
            ("Error".into(), v(to_owned_variant(&object.error()))),
            (
                "ErrorName".into(),
                v(to_owned_variant(&object.error_name())),
            ),
            ("Progress".into(), v(to_owned_variant(&object.progress()))),
            (
                "FreezeDurationMs".into(),
                v(to_owned_variant(&object.freeze_duration_ms())),
            ),
            (
                "FrozenFilesystems".into(),
                v(to_owned_variant(&object.frozen_filesystems())),
            ),
            (
                "CowFillPercent".into(),
                v(to_owned_variant(&object.cow_fill_percent())),
            ),
        ])
    }

    /// The listing's serialization of `objects`, read back generically.
    pub(in crate::bus) fn decoded(objects: &Objects) -> zbus::fdo::ManagedObjects {
        let data = to_bytes(Context::new(Endian::Little, 0), objects).expect("serializes");
        let (decoded, _) = data
            .deserialize::<zbus::fdo::ManagedObjects>()
            .expect("reads back as a{oa{sa{sv}}}");
        decoded
    }

    #[test]
    fn a_snapshot_list_row_holds_what_the_object_serves() {
        use super::super::listing::SnapshotRows;
        assert_eq!(
            <SnapshotRows as zbus::Type>::SIGNATURE,
            <Vec<vmsnap_api::SnapshotRow> as zbus::Type>::SIGNATURE
        );
        let (engine, _requests) = mpsc::channel(1);
        let mut record = crate::store::tests::record("a");
        record.excluded = vec![ExcludedVolume {
            target: "sda".into(),
            reason: "cdrom".into(),
        }]
        .into();
        let entry = SnapshotEntry {
            record: Arc::new(record),
            progress: Arc::from("merging vda"),
        };
        let object = SnapshotObject::new(&entry, engine, Authorizer::Disabled);
        let rows = SnapshotRows(vec![entry]);
        let data = to_bytes(Context::new(Endian::Little, 0), &rows).expect("serializes");
        let (decoded, _) = data
            .deserialize::<Vec<vmsnap_api::SnapshotRow>>()
            .expect("reads back");
        let expected = vmsnap_api::SnapshotRow {
            name: object.name(),
            uuid: object.uuid(),
            vm_name: object.vm_name(),
            vm_uuid: object.vm_uuid(),
            description: object.description(),
            phase: object.phase(),
            ready_to_use: object.ready_to_use(),
            creation_time: object.creation_time(),
            indications: object.indications(),
            source_indications: object.source_indications(),
            included_volumes: object.included_volumes(),
            excluded_volumes: object.excluded_volumes(),
            error: object.error(),
            error_name: object.error_name(),
            progress: object.progress(),
            freeze_duration_ms: object.freeze_duration_ms(),
            frozen_filesystems: object.frozen_filesystems(),
            cow_fill_percent: object.cow_fill_percent(),
        };
        assert_eq!(decoded, vec![expected]);
    }

    /// Two records that set what a plain one leaves empty: a Failed one with its error and an
    /// excluded disk, and one with an indication's message and a copy-on-write fill.
    pub(in crate::bus) fn varied_records() -> [SnapshotRecord; 2] {
        let mut failed = crate::store::tests::record("a");
        failed.phase = vmsnap_api::SnapshotPhase::Failed;
        failed.error = "it broke".into();
        failed.error_name = "org.vmsnap.VmSnap1.Error.StorageFailed".into();
        failed.excluded = vec![ExcludedVolume {
            target: "sda".into(),
            reason: "cdrom".into(),
        }]
        .into();
        let mut with_messages = crate::store::tests::record("bb");
        with_messages.source_indications = vec![SourceIndication {
            indication: "Online".into(),
            message: "the VM was running".into(),
        }];
        with_messages.cow_fill_percent = 12.5;
        [failed, with_messages]
    }

    #[test]
    fn a_listing_serves_what_the_object_serves() {
        let (engine, _requests) = mpsc::channel(1);
        let [mut failed, with_messages] = varied_records();
        failed.indications.push(Indication::PartialSnapshot);
        for record in [failed, with_messages] {
            let record = Arc::new(record);
            let path = zbus::OwnedObjectPath::try_from(vmsnap_api::snapshot_path(&record.uuid))
                .expect("a path");
            let entry = SnapshotEntry {
                record,
                progress: Arc::from("merging vda"),
            };
            let object = SnapshotObject::new(&entry, engine.clone(), Authorizer::Disabled);
            let mut listing = decoded(&Objects(vec![Listed::Snapshot(entry)]));
            let mut interfaces = listing.remove(&path).expect("the object is listed");
            let interface =
                zbus::names::InterfaceName::from_static_str(SNAPSHOT_INTERFACE).expect("a name");
            let properties = interfaces.remove(&interface).expect("its interface");
            assert!(interfaces.is_empty() && listing.is_empty());
            assert_eq!(properties, served(&object));
        }
    }
}
