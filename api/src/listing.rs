//! Typed forms of the listing replies (GetVmObjects, GetSnapshotObjects, GetRestoreObjects:
//! `a{oa{sa{sv}}}`, GetManagedObjects' shape), decoded with serde straight into structures
//! instead of a variant per property. Every property is optional here: which ones a client
//! requires is its own choice (an older vmsnapd lacks some). A property of another type than
//! the interface's makes the whole reply fail to decode; a client that wants to name the
//! property then reads the reply generically.

use std::collections::HashMap;

use zbus::{DeserializeDict, OwnedObjectPath, Type};

/// Properties of `org.vmsnap.VmSnap1.VirtualMachine`.
#[derive(Debug, Default, Clone, PartialEq, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct VmProperties {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub state: Option<String>,
    pub agent: Option<String>,
    pub disks: Option<Vec<crate::DiskInfo>>,
}

/// Properties of `org.vmsnap.VmSnap1.Snapshot`.
#[derive(Debug, Default, Clone, PartialEq, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct SnapshotProperties {
    pub name: Option<String>,
    pub description: Option<String>,
    pub vm_name: Option<String>,
    pub vm_uuid: Option<String>,
    pub uuid: Option<String>,
    pub phase: Option<String>,
    pub ready_to_use: Option<bool>,
    pub creation_time: Option<String>,
    pub source_indications: Option<Vec<crate::SourceIndication>>,
    pub indications: Option<Vec<String>>,
    pub included_volumes: Option<Vec<crate::IncludedVolume>>,
    pub excluded_volumes: Option<Vec<crate::ExcludedVolume>>,
    pub error: Option<String>,
    pub error_name: Option<String>,
    pub progress: Option<String>,
    pub freeze_duration_ms: Option<u64>,
    pub frozen_filesystems: Option<u32>,
    pub cow_fill_percent: Option<f64>,
}

/// Properties of `org.vmsnap.VmSnap1.Restore`.
#[derive(Debug, Default, Clone, PartialEq, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct RestoreProperties {
    pub name: Option<String>,
    pub readiness_policy: Option<String>,
    pub uuid: Option<String>,
    pub vm_name: Option<String>,
    pub snapshot: Option<String>,
    pub target: Option<String>,
    pub new_vm: Option<bool>,
    pub phase: Option<String>,
    pub complete: Option<bool>,
    pub creation_time: Option<String>,
    pub restore_time: Option<String>,
    pub restores: Option<Vec<crate::VolumeRestore>>,
    pub detached_disks: Option<Vec<crate::DetachedDisk>>,
    pub not_restored: Option<Vec<crate::ExcludedVolume>>,
    pub safety_snapshot: Option<String>,
    pub error: Option<String>,
    pub error_name: Option<String>,
    pub progress: Option<String>,
}

/// A listing reply whose objects serve interface properties `P`: object path, then interface
/// name, then the properties.
pub type TypedObjects<P> = HashMap<OwnedObjectPath, HashMap<String, P>>;
