//! Listing replies built straight from the records: GetManagedObjects, GetVmObjects,
//! GetSnapshotObjects and GetRestoreObjects answer `a{oa{sa{sv}}}` serialized from the
//! records the bus layer holds ([`Registry`]), without zbus's generic per-object GetAll (a
//! variant allocated per property, the object tree walked). Each property is written as
//! the object's interface serves it (checked by the tests against zbus's GetAll).
//!
//! The registry holds the same `Arc` of each record as its object: a record is held once by
//! the bus layer. Snapshots have no object of their own between calls: the registry is what
//! their paths serve (`snapshot::SnapshotFallback`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use vmsnap_api::{
    restore_path, snapshot_path, vm_path, ExcludedVolume, IncludedVolume, Indication,
    SourceIndication, MANAGER_INTERFACE, MANAGER_PATH, RESTORE_INTERFACE, SNAPSHOT_INTERFACE,
    VM_INTERFACE,
};
use zbus::{as_variant, Type};

use crate::domain::VmInfo;
use crate::store::{ByUuid, KeyedByUuid, RestoreRecord, SnapshotRecord};

/// A snapshot as the bus layer holds it: its record (shared with its object) and progress.
#[derive(Clone)]
pub struct SnapshotEntry {
    pub record: Arc<SnapshotRecord>,
    pub progress: Arc<str>,
}

impl SnapshotEntry {
    /// A snapshot with no operation running: its progress is one empty string shared by all
    /// (thousands of idle snapshots, no allocation each).
    pub fn idle(record: Arc<SnapshotRecord>) -> Self {
        static NO_PROGRESS: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| Arc::from(""));
        SnapshotEntry {
            record,
            progress: NO_PROGRESS.clone(),
        }
    }
}

/// The snapshots the bus layer holds, found by UUID. A set ordered by the record's own UUID
/// rather than a map keyed by a copy of it: with thousands of records (issue 13) the copies
/// and a hash table's spare buckets were about 100 bytes a snapshot.
#[derive(Default)]
pub struct Snapshots(BTreeSet<ByUuid<SnapshotEntry>>);

impl KeyedByUuid for SnapshotEntry {
    fn uuid(&self) -> &str {
        &self.record.uuid
    }
}

impl Snapshots {
    /// Adds a snapshot, or replaces the one with its UUID; true if there was one.
    pub fn insert(&mut self, entry: SnapshotEntry) -> bool {
        self.0.replace(ByUuid(entry)).is_some()
    }

    pub fn get(&self, uuid: &str) -> Option<&SnapshotEntry> {
        self.0.get(uuid).map(|e| &e.0)
    }

    /// Replaces a known snapshot's record, keeping its progress; an unknown one is ignored.
    pub fn update_record(&mut self, record: Arc<SnapshotRecord>) {
        if let Some(ByUuid(old)) = self.0.take(record.uuid.as_str()) {
            self.0.replace(ByUuid(SnapshotEntry {
                record,
                progress: old.progress,
            }));
        }
    }

    /// Sets a known snapshot's progress; an unknown one is ignored.
    pub fn set_progress(&mut self, uuid: &str, progress: Arc<str>) {
        if let Some(ByUuid(old)) = self.0.take(uuid) {
            self.0.replace(ByUuid(SnapshotEntry {
                record: old.record,
                progress,
            }));
        }
    }

    /// Removes a snapshot; false if there was none with that UUID.
    pub fn remove(&mut self, uuid: &str) -> bool {
        self.0.remove(uuid)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &SnapshotEntry> {
        self.0.iter().map(|e| &e.0)
    }
}

/// A restore as the bus layer holds it.
#[derive(Clone)]
pub struct RestoreEntry {
    pub record: Arc<RestoreRecord>,
    pub progress: Arc<str>,
}

/// The manager's properties.
#[derive(Clone, Default)]
pub struct ManagerState {
    pub libvirt_uri: String,
    pub libvirt_connected: bool,
    pub libvirt_error: String,
}

/// What the exported objects show, kept by the publisher beside the ObjectServer (updated
/// before each object change is announced), read by the listing methods.
#[derive(Default)]
pub struct Registry {
    pub manager: ManagerState,
    pub vms: HashMap<String, Arc<VmInfo>>,
    pub snapshots: Snapshots,
    pub restores: HashMap<String, RestoreEntry>,
}

/// The registry, shared by the publisher and the listing methods. Never held across an await.
pub type SharedRegistry = Arc<RwLock<Registry>>;

/// Reads the registry, whatever a panicking writer left (the data is plain values).
pub fn read(registry: &SharedRegistry) -> std::sync::RwLockReadGuard<'_, Registry> {
    registry
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes the registry.
pub fn write(registry: &SharedRegistry) -> std::sync::RwLockWriteGuard<'_, Registry> {
    registry
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One object of a listing.
#[derive(Clone)]
pub enum Listed {
    /// A node that only holds other objects (`.../snapshot`): zbus's GetManagedObjects lists
    /// it with no interface, and so does this one.
    Folder(&'static str),
    Manager(ManagerState),
    Vm(Arc<VmInfo>),
    Snapshot(SnapshotEntry),
    Restore(RestoreEntry),
}

/// A listing reply: `a{oa{sa{sv}}}`, GetManagedObjects' shape, in the given order.
pub struct Objects(pub Vec<Listed>);

impl Type for Objects {
    const SIGNATURE: &'static zbus::Signature = <zbus::fdo::ManagedObjects as Type>::SIGNATURE;
}

impl Serialize for Objects {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for listed in &self.0 {
            let path = match listed {
                Listed::Folder(path) => (*path).to_string(),
                Listed::Manager(_) => MANAGER_PATH.to_string(),
                Listed::Vm(vm) => vm_path(&vm.uuid),
                Listed::Snapshot(s) => snapshot_path(&s.record.uuid),
                Listed::Restore(r) => restore_path(&r.record.uuid),
            };
            let path = zbus::ObjectPath::try_from(path.as_str())
                .map_err(|e| serde::ser::Error::custom(e.to_string()))?;
            map.serialize_entry(&path, &Interfaces(listed))?;
        }
        map.end()
    }
}

/// `a{sa{sv}}` of one object: its one interface with its properties.
struct Interfaces<'a>(&'a Listed);

impl Type for Interfaces<'_> {
    const SIGNATURE: &'static zbus::Signature =
        <HashMap<String, HashMap<String, zbus::OwnedVariant>> as Type>::SIGNATURE;
}

/// A snapshot's interfaces with their properties (`a{sa{sv}}`), as GetManagedObjects lists
/// them: InterfacesAdded's second argument.
pub struct SnapshotInterfaces(Listed);

pub fn snapshot_interfaces(entry: &SnapshotEntry) -> SnapshotInterfaces {
    SnapshotInterfaces(Listed::Snapshot(entry.clone()))
}

impl Type for SnapshotInterfaces {
    const SIGNATURE: &'static zbus::Signature = <Interfaces<'static> as Type>::SIGNATURE;
}

impl Serialize for SnapshotInterfaces {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Interfaces(&self.0).serialize(serializer)
    }
}

impl Serialize for Interfaces<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let len = usize::from(!matches!(self.0, Listed::Folder(_)));
        let mut map = serializer.serialize_map(Some(len))?;
        match self.0 {
            Listed::Folder(_) => {}
            Listed::Manager(m) => {
                map.serialize_entry(MANAGER_INTERFACE, &ManagerProps::new(m))?;
            }
            Listed::Vm(vm) => map.serialize_entry(VM_INTERFACE, &VmProps::new(vm))?,
            Listed::Snapshot(s) => {
                map.serialize_entry(SNAPSHOT_INTERFACE, &SnapshotProps::new(s))?;
            }
            Listed::Restore(r) => {
                map.serialize_entry(RESTORE_INTERFACE, &RestoreProps::new(r))?;
            }
        }
        map.end()
    }
}

#[derive(Serialize, Type)]
#[zbus(signature = "a{sv}")]
struct ManagerProps<'a> {
    #[serde(rename = "Version", with = "as_variant")]
    version: &'static str,
    #[serde(rename = "LibvirtUri", with = "as_variant")]
    libvirt_uri: &'a str,
    #[serde(rename = "LibvirtConnected", with = "as_variant")]
    libvirt_connected: bool,
    #[serde(rename = "LibvirtError", with = "as_variant")]
    libvirt_error: &'a str,
}

impl<'a> ManagerProps<'a> {
    fn new(m: &'a ManagerState) -> Self {
        ManagerProps {
            version: env!("CARGO_PKG_VERSION"),
            libvirt_uri: &m.libvirt_uri,
            libvirt_connected: m.libvirt_connected,
            libvirt_error: &m.libvirt_error,
        }
    }
}

#[derive(Serialize, Type)]
#[zbus(signature = "a{sv}")]
struct VmProps<'a> {
    #[serde(rename = "Name", with = "as_variant")]
    name: &'a str,
    #[serde(rename = "Uuid", with = "as_variant")]
    uuid: &'a str,
    #[serde(rename = "State", with = "as_variant")]
    state: &'static str,
    #[serde(rename = "Agent", with = "as_variant")]
    agent: &'static str,
    #[serde(rename = "Disks", with = "as_variant")]
    disks: &'a Vec<vmsnap_api::DiskInfo>,
}

impl<'a> VmProps<'a> {
    fn new(vm: &'a VmInfo) -> Self {
        VmProps {
            name: &vm.name,
            uuid: &vm.uuid,
            state: vm.state.as_str(),
            agent: vm.agent.as_str(),
            disks: &vm.disks,
        }
    }
}

/// Indications as `as`, without a string allocated per indication.
struct IndicationNames<'a>(&'a [Indication]);

impl Type for IndicationNames<'_> {
    const SIGNATURE: &'static zbus::Signature = <Vec<String> as Type>::SIGNATURE;
}

impl Serialize for IndicationNames<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for indication in self.0 {
            seq.serialize_element(indication.as_str())?;
        }
        seq.end()
    }
}

#[derive(Serialize, Type)]
#[zbus(signature = "a{sv}")]
struct SnapshotProps<'a> {
    #[serde(rename = "Name", with = "as_variant")]
    name: &'a str,
    #[serde(rename = "Description", with = "as_variant")]
    description: &'a str,
    #[serde(rename = "VmName", with = "as_variant")]
    vm_name: &'a str,
    #[serde(rename = "VmUuid", with = "as_variant")]
    vm_uuid: &'a str,
    #[serde(rename = "Uuid", with = "as_variant")]
    uuid: &'a str,
    #[serde(rename = "Phase", with = "as_variant")]
    phase: &'static str,
    #[serde(rename = "ReadyToUse", with = "as_variant")]
    ready_to_use: bool,
    #[serde(rename = "CreationTime", with = "as_variant")]
    creation_time: &'a str,
    #[serde(rename = "SourceIndications", with = "as_variant")]
    source_indications: std::borrow::Cow<'a, [SourceIndication]>,
    #[serde(rename = "Indications", with = "as_variant")]
    indications: IndicationNames<'a>,
    #[serde(rename = "IncludedVolumes", with = "as_variant")]
    included_volumes: Vec<IncludedVolume>,
    #[serde(rename = "ExcludedVolumes", with = "as_variant")]
    excluded_volumes: &'a [ExcludedVolume],
    #[serde(rename = "Error", with = "as_variant")]
    error: &'a str,
    #[serde(rename = "ErrorName", with = "as_variant")]
    error_name: &'a str,
    #[serde(rename = "Progress", with = "as_variant")]
    progress: &'a str,
    #[serde(rename = "FreezeDurationMs", with = "as_variant")]
    freeze_duration_ms: u64,
    #[serde(rename = "FrozenFilesystems", with = "as_variant")]
    frozen_filesystems: u32,
    #[serde(rename = "CowFillPercent", with = "as_variant")]
    cow_fill_percent: f64,
}

impl<'a> SnapshotProps<'a> {
    fn new(entry: &'a SnapshotEntry) -> Self {
        let r = &*entry.record;
        SnapshotProps {
            name: &r.name,
            description: &r.description,
            vm_name: &r.vm_name,
            vm_uuid: &r.vm_uuid,
            uuid: &r.uuid,
            phase: r.phase.as_str(),
            ready_to_use: r.ready_to_use,
            creation_time: &r.creation_time,
            source_indications: super::snapshot::source_indications(r),
            indications: IndicationNames(&r.indications),
            included_volumes: r.included_volumes(),
            excluded_volumes: &r.excluded,
            error: &r.error,
            error_name: &r.error_name,
            progress: &entry.progress,
            freeze_duration_ms: r.freeze_duration_ms,
            frozen_filesystems: r.frozen_filesystems,
            cow_fill_percent: r.cow_fill_percent,
        }
    }
}

#[derive(Serialize, Type)]
#[zbus(signature = "a{sv}")]
struct RestoreProps<'a> {
    #[serde(rename = "Name", with = "as_variant")]
    name: &'a str,
    #[serde(rename = "ReadinessPolicy", with = "as_variant")]
    readiness_policy: &'a str,
    #[serde(rename = "Uuid", with = "as_variant")]
    uuid: &'a str,
    #[serde(rename = "VmName", with = "as_variant")]
    vm_name: &'a str,
    #[serde(rename = "Snapshot", with = "as_variant")]
    snapshot: &'a str,
    #[serde(rename = "Target", with = "as_variant")]
    target: &'a str,
    #[serde(rename = "NewVm", with = "as_variant")]
    new_vm: bool,
    #[serde(rename = "Phase", with = "as_variant")]
    phase: &'static str,
    #[serde(rename = "Complete", with = "as_variant")]
    complete: bool,
    #[serde(rename = "CreationTime", with = "as_variant")]
    creation_time: &'a str,
    #[serde(rename = "RestoreTime", with = "as_variant")]
    restore_time: &'a str,
    #[serde(rename = "Restores", with = "as_variant")]
    restores: &'a Vec<vmsnap_api::VolumeRestore>,
    #[serde(rename = "DetachedDisks", with = "as_variant")]
    detached_disks: &'a Vec<vmsnap_api::DetachedDisk>,
    #[serde(rename = "NotRestored", with = "as_variant")]
    not_restored: &'a Vec<ExcludedVolume>,
    #[serde(rename = "SafetySnapshot", with = "as_variant")]
    safety_snapshot: &'a str,
    #[serde(rename = "Error", with = "as_variant")]
    error: &'a str,
    #[serde(rename = "ErrorName", with = "as_variant")]
    error_name: &'a str,
    #[serde(rename = "Progress", with = "as_variant")]
    progress: &'a str,
}

impl<'a> RestoreProps<'a> {
    fn new(entry: &'a RestoreEntry) -> Self {
        let r = &*entry.record;
        RestoreProps {
            name: &r.name,
            readiness_policy: &r.readiness_policy,
            uuid: &r.uuid,
            vm_name: &r.vm_name,
            snapshot: &r.snapshot_name,
            target: &r.target_name,
            new_vm: r.new_vm,
            phase: r.phase.as_str(),
            complete: r.complete,
            creation_time: &r.creation_time,
            restore_time: &r.restore_time,
            restores: &r.restores,
            detached_disks: &r.detached,
            not_restored: &r.not_restored,
            safety_snapshot: &r.safety_snapshot,
            error: &r.error,
            error_name: &r.error_name,
            progress: &entry.progress,
        }
    }
}

/// GetSnapshotList's reply: `a(ssssssbsasa(ss)a(ssst)a(ss)ssstud)`, [`vmsnap_api::SnapshotRow`]
/// serialized from the records.
pub struct SnapshotRows(pub Vec<SnapshotEntry>);

impl Type for SnapshotRows {
    const SIGNATURE: &'static zbus::Signature = <Vec<vmsnap_api::SnapshotRow> as Type>::SIGNATURE;
}

impl Serialize for SnapshotRows {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for entry in &self.0 {
            seq.serialize_element(&SnapshotRowRef::new(entry))?;
        }
        seq.end()
    }
}

/// [`vmsnap_api::SnapshotRow`] borrowed from a record: the same fields in the same order (a
/// test checks the signatures match).
#[derive(Serialize, Type)]
struct SnapshotRowRef<'a> {
    name: &'a str,
    uuid: &'a str,
    vm_name: &'a str,
    vm_uuid: &'a str,
    description: &'a str,
    phase: &'static str,
    ready_to_use: bool,
    creation_time: &'a str,
    indications: IndicationNames<'a>,
    source_indications: std::borrow::Cow<'a, [SourceIndication]>,
    included_volumes: Vec<IncludedVolume>,
    excluded_volumes: &'a [ExcludedVolume],
    error: &'a str,
    error_name: &'a str,
    progress: &'a str,
    freeze_duration_ms: u64,
    frozen_filesystems: u32,
    cow_fill_percent: f64,
}

impl<'a> SnapshotRowRef<'a> {
    fn new(entry: &'a SnapshotEntry) -> Self {
        let r = &*entry.record;
        SnapshotRowRef {
            name: &r.name,
            uuid: &r.uuid,
            vm_name: &r.vm_name,
            vm_uuid: &r.vm_uuid,
            description: &r.description,
            phase: r.phase.as_str(),
            ready_to_use: r.ready_to_use,
            creation_time: &r.creation_time,
            indications: IndicationNames(&r.indications),
            source_indications: super::snapshot::source_indications(r),
            included_volumes: r.included_volumes(),
            excluded_volumes: &r.excluded,
            error: &r.error,
            error_name: &r.error_name,
            progress: &entry.progress,
            freeze_duration_ms: r.freeze_duration_ms,
            frozen_filesystems: r.frozen_filesystems,
            cow_fill_percent: r.cow_fill_percent,
        }
    }
}

const VM_FOLDER: &str = "/org/vmsnap/VmSnap1/vm";
const SNAPSHOT_FOLDER: &str = "/org/vmsnap/VmSnap1/snapshot";
const RESTORE_FOLDER: &str = "/org/vmsnap/VmSnap1/restore";

/// `org.freedesktop.DBus.ObjectManager` at the root: GetManagedObjects answered from the
/// registry. zbus still emits InterfacesAdded and InterfacesRemoved for every object exported
/// under it (it knows an ObjectManager by its interface name); for snapshots, which are not
/// exported one by one, the publisher emits them (`bus::apply`).
pub struct RootObjectManager {
    registry: SharedRegistry,
}

impl RootObjectManager {
    pub fn new(registry: SharedRegistry) -> Self {
        RootObjectManager { registry }
    }
}

/// Every object, as GetManagedObjects lists them: the manager, then VMs, snapshots and
/// restores (dict order carries no meaning).
pub fn all_objects(registry: &Registry) -> Objects {
    let mut listed = Vec::with_capacity(
        4 + registry.vms.len() + registry.snapshots.len() + registry.restores.len(),
    );
    listed.push(Listed::Manager(registry.manager.clone()));
    for (folder, any) in [
        (VM_FOLDER, !registry.vms.is_empty()),
        (SNAPSHOT_FOLDER, !registry.snapshots.is_empty()),
        (RESTORE_FOLDER, !registry.restores.is_empty()),
    ] {
        if any {
            listed.push(Listed::Folder(folder));
        }
    }
    listed.extend(registry.vms.values().cloned().map(Listed::Vm));
    listed.extend(registry.snapshots.iter().cloned().map(Listed::Snapshot));
    listed.extend(registry.restores.values().cloned().map(Listed::Restore));
    Objects(listed)
}

#[zbus::interface(
    name = "org.freedesktop.DBus.ObjectManager",
    introspection_docs = false
)]
impl RootObjectManager {
    /// Every object under the root with its interfaces and their properties.
    async fn get_managed_objects(&self) -> Objects {
        all_objects(&read(&self.registry))
    }

    /// Emitted (by zbus's object server, or the publisher for a snapshot) when an object is
    /// exported.
    #[zbus(signal)]
    pub async fn interfaces_added(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        object_path: zbus::ObjectPath<'_>,
        interfaces_and_properties: HashMap<
            zbus::names::InterfaceName<'_>,
            HashMap<&str, zbus::Variant<'_>>,
        >,
    ) -> zbus::Result<()>;

    /// Emitted (by zbus's object server, or the publisher for a snapshot) when an object is
    /// removed.
    #[zbus(signal)]
    pub async fn interfaces_removed(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        object_path: zbus::ObjectPath<'_>,
        interfaces: Vec<zbus::names::InterfaceName<'_>>,
    ) -> zbus::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> SnapshotEntry {
        SnapshotEntry::idle(Arc::new(crate::store::tests::record(name)))
    }

    #[test]
    fn snapshots_are_found_updated_and_removed_by_uuid() {
        let mut snapshots = Snapshots::default();
        for name in ["c", "a", "b"] {
            snapshots.insert(entry(name));
        }
        assert_eq!(snapshots.len(), 3);
        let uuids: Vec<&str> = snapshots.iter().map(|e| e.record.uuid.as_str()).collect();
        assert_eq!(uuids, ["uuid-a", "uuid-b", "uuid-c"]);

        snapshots.set_progress("uuid-b", Arc::from("merging vda"));
        let mut changed = crate::store::tests::record("b");
        changed.error = "it broke".into();
        snapshots.update_record(Arc::new(changed));
        let b = snapshots.get("uuid-b").expect("b is there");
        assert_eq!(&*b.record.error, "it broke");
        assert_eq!(
            &*b.progress, "merging vda",
            "a new record keeps the progress"
        );
        assert_eq!(&*snapshots.get("uuid-a").expect("a").progress, "");

        // A second insert of the same UUID replaces the first, as a map's would.
        snapshots.insert(entry("b"));
        assert_eq!(snapshots.len(), 3);
        assert_eq!(&*snapshots.get("uuid-b").expect("b").record.error, "");

        // Unknown UUIDs change nothing.
        snapshots.update_record(Arc::new(crate::store::tests::record("zz")));
        snapshots.set_progress("uuid-zz", Arc::from("x"));
        assert!(snapshots.get("uuid-zz").is_none());
        assert_eq!(snapshots.len(), 3);

        snapshots.remove("uuid-a");
        assert!(snapshots.get("uuid-a").is_none());
        assert_eq!(snapshots.len(), 2);
    }

    #[test]
    fn idle_snapshots_share_one_empty_progress() {
        let (a, b) = (entry("a"), entry("b"));
        assert_eq!(&*a.progress, "");
        assert!(Arc::ptr_eq(&a.progress, &b.progress));
    }
}
