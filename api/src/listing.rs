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

/// One snapshot as `Manager.GetSnapshotList` returns it: every property of the Snapshot
/// interface in one structure, `(ssssssbsasa(ss)a(ssst)a(ss)ssstud)` in field order. A listing
/// of 10,000 snapshots is about a third of GetSnapshotObjects' size and needs no variant per
/// property. A property added to the interface later is not in it (a new method would be).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize, Type)]
pub struct SnapshotRow {
    pub name: String,
    pub uuid: String,
    pub vm_name: String,
    pub vm_uuid: String,
    pub description: String,
    pub phase: String,
    pub ready_to_use: bool,
    pub creation_time: String,
    pub indications: Vec<String>,
    pub source_indications: Vec<crate::SourceIndication>,
    pub included_volumes: Vec<crate::IncludedVolume>,
    pub excluded_volumes: Vec<crate::ExcludedVolume>,
    pub error: String,
    pub error_name: String,
    pub progress: String,
    pub freeze_duration_ms: u64,
    pub frozen_filesystems: u32,
    pub cow_fill_percent: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_row_is_the_documented_structure() {
        assert_eq!(
            SnapshotRow::SIGNATURE.to_string(),
            "(ssssssbsasa(ss)a(ssst)a(ss)ssstud)"
        );
    }
}
