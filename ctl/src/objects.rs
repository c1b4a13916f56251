//! The objects of a listing in one call: the manager's GetSnapshotObjects and
//! GetRestoreObjects (shaped as GetManagedObjects' reply, `a{oa{sa{sv}}}`, for just those
//! objects), and the [`Snapshot`] and [`Restore`] values built
//! from the property maps. Lists read this instead of one GetAll per object.
//!
//! A property that a vmsnapd older than it lacks reads as its empty value; any other property
//! that is missing, or one of the wrong type, is an error naming the object and the property.

use std::collections::HashMap;

use vmsnap_api::{
    DetachedDisk, ExcludedVolume, IncludedVolume, RestoreProperties, SnapshotProperties,
    SourceIndication, TypedObjects, VolumeRestore, RESTORE_INTERFACE, SNAPSHOT_INTERFACE,
};
use zbus::fdo::ManagedObjects;
use zbus::names::InterfaceName;
use zbus::{OwnedObjectPath, OwnedVariant, Type};

use crate::restore_output::Restore;
use crate::snapshot_output::Snapshot;

/// The objects of one GetSnapshotObjects or GetRestoreObjects reply: decoded typed (serde,
/// no variant per property), or generically when the typed decoding refused it, so that a
/// property of the wrong type is named.
pub enum Objects {
    Generic(ManagedObjects),
    Snapshots(TypedObjects<SnapshotProperties>),
    Restores(TypedObjects<RestoreProperties>),
}

impl Objects {
    pub fn new(objects: ManagedObjects) -> Objects {
        Objects::Generic(objects)
    }

    /// Takes the properties of `interface` on the object at `path` out of the reply; `None`
    /// when the object (or that interface of it) is not there: it was removed after it was
    /// listed.
    fn take(&mut self, path: &OwnedObjectPath, interface: &'static str) -> Option<Properties> {
        let kind = if interface == SNAPSHOT_INTERFACE {
            "snapshot"
        } else {
            "restore"
        };
        let object = format!("{kind} {}", path.as_str());
        let values = match self {
            Objects::Generic(objects) => {
                let name = InterfaceName::from_static_str(interface).ok()?;
                Values::Generic(objects.get_mut(path)?.remove(&name)?)
            }
            Objects::Snapshots(objects) => {
                Values::Snapshot(Box::new(objects.get_mut(path)?.remove(interface)?))
            }
            Objects::Restores(objects) => {
                Values::Restore(Box::new(objects.get_mut(path)?.remove(interface)?))
            }
        };
        Some(Properties { object, values })
    }

    /// Every snapshot of the reply, oldest first as ListSnapshots orders them (creation time,
    /// then name, then UUID), without asking ListSnapshots.
    pub fn into_snapshots(mut self) -> Result<Vec<Snapshot>, String> {
        let paths: Vec<OwnedObjectPath> = match &self {
            Objects::Generic(objects) => objects.keys().cloned().collect(),
            Objects::Snapshots(objects) => objects.keys().cloned().collect(),
            Objects::Restores(_) => Vec::new(),
        };
        let mut snapshots = Vec::with_capacity(paths.len());
        for path in &paths {
            // A path without the Snapshot interface (none in vmsnapd's replies) is skipped.
            if let Some(mut properties) = self.take_snapshot(path) {
                snapshots.push(properties.snapshot()?);
            }
        }
        snapshots.sort_by(|a, b| {
            (a.creation_time.as_str(), a.name.as_str(), a.uuid.as_str()).cmp(&(
                b.creation_time.as_str(),
                b.name.as_str(),
                b.uuid.as_str(),
            ))
        });
        Ok(snapshots)
    }

    /// The properties of the snapshot at `path`; `None` if it is gone.
    pub fn take_snapshot(&mut self, path: &OwnedObjectPath) -> Option<Properties> {
        self.take(path, SNAPSHOT_INTERFACE)
    }

    /// The properties of the restore at `path`; `None` if it is gone.
    pub fn take_restore(&mut self, path: &OwnedObjectPath) -> Option<Properties> {
        self.take(path, RESTORE_INTERFACE)
    }
}

/// The properties of one interface of one object. Each is taken out as it is read.
pub struct Properties {
    /// "snapshot /org/vmsnap/VmSnap1/snapshot/...", for messages.
    object: String,
    values: Values,
}

enum Values {
    Generic(HashMap<String, OwnedVariant>),
    Snapshot(Box<SnapshotProperties>),
    Restore(Box<RestoreProperties>),
}

/// A typed property every vmsnapd that vmsnapctl talks to has.
fn required<T>(object: &str, name: &str, value: Option<T>) -> Result<T, String> {
    value.ok_or_else(|| {
        format!("vmsnapd's {object} has no property {name} (is vmsnapd older than vmsnapctl?)")
    })
}

impl Properties {
    #[cfg(test)]
    pub fn new(object: String, map: HashMap<String, OwnedVariant>) -> Properties {
        Properties {
            object,
            values: Values::Generic(map),
        }
    }

    #[cfg(test)]
    fn typed_snapshot(object: String, properties: SnapshotProperties) -> Properties {
        Properties {
            object,
            values: Values::Snapshot(Box::new(properties)),
        }
    }

    /// A property every vmsnapd that vmsnapctl talks to has.
    fn required<T>(&mut self, name: &str) -> Result<T, String>
    where
        T: Type + TryFrom<OwnedVariant>,
        T::Error: std::fmt::Display,
    {
        match self.optional(name)? {
            Some(value) => Ok(value),
            None => Err(format!(
                "vmsnapd's {} has no property {name} (is vmsnapd older than vmsnapctl?)",
                self.object
            )),
        }
    }

    /// A property an older vmsnapd lacks: `None` then. Of the wrong type, it is an error all
    /// the same.
    fn optional<T>(&mut self, name: &str) -> Result<Option<T>, String>
    where
        T: Type + TryFrom<OwnedVariant>,
        T::Error: std::fmt::Display,
    {
        // Typed values are read by their own fields, never one by one.
        let Values::Generic(map) = &mut self.values else {
            return Ok(None);
        };
        let Some(value) = map.remove(name) else {
            return Ok(None);
        };
        // Checked first: the conversion of a structure of fewer fields than asked would panic.
        let actual = value.value_signature();
        if actual != T::SIGNATURE {
            return Err(format!(
                "vmsnapd's {} has property {name} of type '{actual}', expected '{}'",
                self.object,
                T::SIGNATURE
            ));
        }
        T::try_from(value).map(Some).map_err(|e| {
            format!(
                "vmsnapd's {} has an unreadable property {name}: {e}",
                self.object
            )
        })
    }

    /// A string property an older vmsnapd lacks: empty then.
    fn optional_string(&mut self, name: &str) -> Result<String, String> {
        Ok(self.optional::<String>(name)?.unwrap_or_default())
    }

    /// SourceIndications (absent from an older vmsnapd: none).
    pub fn source_indications(&mut self) -> Result<Vec<SourceIndication>, String> {
        if let Values::Snapshot(p) = &mut self.values {
            return Ok(p.source_indications.take().unwrap_or_default());
        }
        let list: Option<Vec<(String, String)>> = self.optional("SourceIndications")?;
        Ok(list
            .unwrap_or_default()
            .into_iter()
            .map(|(indication, message)| SourceIndication {
                indication,
                message,
            })
            .collect())
    }

    /// A restore's Name (absent from an older vmsnapd: empty).
    pub fn restore_name(&mut self) -> Result<String, String> {
        if let Values::Restore(p) = &mut self.values {
            return Ok(p.name.take().unwrap_or_default());
        }
        self.optional_string("Name")
    }

    /// The snapshot these are the properties of, as `snapshot list` and `show` print it.
    pub fn snapshot(&mut self) -> Result<Snapshot, String> {
        if let Values::Snapshot(p) = &mut self.values {
            let o = self.object.as_str();
            return Ok(Snapshot {
                name: required(o, "Name", p.name.take())?,
                uuid: required(o, "Uuid", p.uuid.take())?,
                vm: required(o, "VmName", p.vm_name.take())?,
                vm_uuid: required(o, "VmUuid", p.vm_uuid.take())?,
                description: required(o, "Description", p.description.take())?,
                phase: required(o, "Phase", p.phase.take())?,
                ready_to_use: required(o, "ReadyToUse", p.ready_to_use.take())?,
                creation_time: required(o, "CreationTime", p.creation_time.take())?,
                indications: required(o, "Indications", p.indications.take())?,
                included_volumes: required(o, "IncludedVolumes", p.included_volumes.take())?,
                excluded_volumes: required(o, "ExcludedVolumes", p.excluded_volumes.take())?,
                error: required(o, "Error", p.error.take())?,
                // Absent from a vmsnapd older than ErrorName.
                error_name: p.error_name.take().unwrap_or_default(),
                progress: required(o, "Progress", p.progress.take())?,
                freeze_duration_ms: required(o, "FreezeDurationMs", p.freeze_duration_ms.take())?,
                frozen_filesystems: required(o, "FrozenFilesystems", p.frozen_filesystems.take())?,
                cow_fill_percent: required(o, "CowFillPercent", p.cow_fill_percent.take())?,
            });
        }
        let included: Vec<(String, String, String, u64)> = self.required("IncludedVolumes")?;
        let excluded: Vec<(String, String)> = self.required("ExcludedVolumes")?;
        Ok(Snapshot {
            name: self.required("Name")?,
            uuid: self.required("Uuid")?,
            vm: self.required("VmName")?,
            vm_uuid: self.required("VmUuid")?,
            description: self.required("Description")?,
            phase: self.required("Phase")?,
            ready_to_use: self.required("ReadyToUse")?,
            creation_time: self.required("CreationTime")?,
            indications: self.required("Indications")?,
            included_volumes: included
                .into_iter()
                .map(|(target, backend, image, virtual_size)| IncludedVolume {
                    target,
                    backend,
                    image,
                    virtual_size,
                })
                .collect(),
            excluded_volumes: excluded.into_iter().map(excluded_volume).collect(),
            error: self.required("Error")?,
            // Absent from a vmsnapd older than ErrorName.
            error_name: self.optional_string("ErrorName")?,
            progress: self.required("Progress")?,
            freeze_duration_ms: self.required("FreezeDurationMs")?,
            frozen_filesystems: self.required("FrozenFilesystems")?,
            cow_fill_percent: self.required("CowFillPercent")?,
        })
    }

    /// The restore these are the properties of, as `restore list` prints it.
    pub fn restore(&mut self) -> Result<Restore, String> {
        if let Values::Restore(p) = &mut self.values {
            let o = self.object.as_str();
            return Ok(Restore {
                uuid: required(o, "Uuid", p.uuid.take())?,
                vm: required(o, "VmName", p.vm_name.take())?,
                snapshot: required(o, "Snapshot", p.snapshot.take())?,
                target: required(o, "Target", p.target.take())?,
                new_vm: required(o, "NewVm", p.new_vm.take())?,
                phase: required(o, "Phase", p.phase.take())?,
                complete: required(o, "Complete", p.complete.take())?,
                creation_time: required(o, "CreationTime", p.creation_time.take())?,
                restore_time: required(o, "RestoreTime", p.restore_time.take())?,
                restores: required(o, "Restores", p.restores.take())?,
                detached_disks: required(o, "DetachedDisks", p.detached_disks.take())?,
                not_restored: required(o, "NotRestored", p.not_restored.take())?,
                safety_snapshot: required(o, "SafetySnapshot", p.safety_snapshot.take())?,
                error: required(o, "Error", p.error.take())?,
                // Absent from a vmsnapd older than ErrorName.
                error_name: p.error_name.take().unwrap_or_default(),
                progress: required(o, "Progress", p.progress.take())?,
            });
        }
        let restores: Vec<(String, String, String)> = self.required("Restores")?;
        let detached: Vec<(String, String)> = self.required("DetachedDisks")?;
        let not_restored: Vec<(String, String)> = self.required("NotRestored")?;
        Ok(Restore {
            uuid: self.required("Uuid")?,
            vm: self.required("VmName")?,
            snapshot: self.required("Snapshot")?,
            target: self.required("Target")?,
            new_vm: self.required("NewVm")?,
            phase: self.required("Phase")?,
            complete: self.required("Complete")?,
            creation_time: self.required("CreationTime")?,
            restore_time: self.required("RestoreTime")?,
            restores: restores
                .into_iter()
                .map(|(target, from_image, to_image)| VolumeRestore {
                    target,
                    from_image,
                    to_image,
                })
                .collect(),
            detached_disks: detached
                .into_iter()
                .map(|(target, source)| DetachedDisk { target, source })
                .collect(),
            not_restored: not_restored.into_iter().map(excluded_volume).collect(),
            safety_snapshot: self.required("SafetySnapshot")?,
            error: self.required("Error")?,
            // Absent from a vmsnapd older than ErrorName.
            error_name: self.optional_string("ErrorName")?,
            progress: self.required("Progress")?,
        })
    }
}

fn excluded_volume((target, reason): (String, String)) -> ExcludedVolume {
    ExcludedVolume { target, reason }
}

#[cfg(test)]
mod tests {
    use zbus::Variant;

    use super::*;
    use crate::kube::model::tests::snapshot as expected_snapshot;

    fn value(v: impl Into<Variant<'static>>) -> OwnedVariant {
        OwnedVariant::try_from(v.into()).expect("owned")
    }

    /// The properties vmsnapd serves for kube::model's test snapshot.
    fn snapshot_properties() -> HashMap<String, OwnedVariant> {
        let s = expected_snapshot();
        let included: Vec<(String, String, String, u64)> = s
            .included_volumes
            .iter()
            .map(|v| {
                (
                    v.target.clone(),
                    v.backend.clone(),
                    v.image.clone(),
                    v.virtual_size,
                )
            })
            .collect();
        let excluded: Vec<(String, String)> = s
            .excluded_volumes
            .iter()
            .map(|v| (v.target.clone(), v.reason.clone()))
            .collect();
        let mut map = HashMap::new();
        map.insert("Name".to_string(), value(s.name));
        map.insert("Uuid".to_string(), value(s.uuid));
        map.insert("VmName".to_string(), value(s.vm));
        map.insert("VmUuid".to_string(), value(s.vm_uuid));
        map.insert("Description".to_string(), value(s.description));
        map.insert("Phase".to_string(), value(s.phase));
        map.insert("ReadyToUse".to_string(), value(s.ready_to_use));
        map.insert("CreationTime".to_string(), value(s.creation_time));
        map.insert("Indications".to_string(), value(s.indications));
        map.insert("IncludedVolumes".to_string(), value(included));
        map.insert("ExcludedVolumes".to_string(), value(excluded));
        map.insert("Error".to_string(), value(s.error));
        map.insert("ErrorName".to_string(), value(s.error_name));
        map.insert("Progress".to_string(), value(s.progress));
        map.insert("FreezeDurationMs".to_string(), value(s.freeze_duration_ms));
        map.insert("FrozenFilesystems".to_string(), value(s.frozen_filesystems));
        map.insert("CowFillPercent".to_string(), value(s.cow_fill_percent));
        map.insert(
            "SourceIndications".to_string(),
            value(vec![(
                "Online".to_string(),
                "the VM was running".to_string(),
            )]),
        );
        map
    }

    fn properties(map: HashMap<String, OwnedVariant>) -> Properties {
        Properties::new("snapshot /org/vmsnap/VmSnap1/snapshot/s1".into(), map)
    }

    #[test]
    fn snapshot_from_properties() {
        let mut p = properties(snapshot_properties());
        let snapshot = p.snapshot().expect("reads");
        assert_eq!(snapshot, expected_snapshot());
        assert_eq!(
            p.source_indications().expect("reads"),
            vec![SourceIndication {
                indication: "Online".into(),
                message: "the VM was running".into(),
            }]
        );
    }

    #[test]
    fn older_vmsnapd_lacks_error_name_and_source_indications() {
        let mut map = snapshot_properties();
        map.insert("Error".to_string(), value("no agent".to_string()));
        for name in ["ErrorName", "SourceIndications"] {
            map.remove(name);
        }
        let mut p = properties(map);
        let snapshot = p.snapshot().expect("reads");
        assert_eq!(snapshot.error, "no agent");
        assert_eq!(snapshot.error_name, "");
        assert!(p.source_indications().expect("reads").is_empty());
    }

    #[test]
    fn a_missing_property_is_an_error() {
        let mut map = snapshot_properties();
        map.remove("CowFillPercent");
        let error = properties(map).snapshot().expect_err("an error");
        assert_eq!(
            error,
            "vmsnapd's snapshot /org/vmsnap/VmSnap1/snapshot/s1 has no property CowFillPercent \
             (is vmsnapd older than vmsnapctl?)"
        );
    }

    #[test]
    fn a_property_of_the_wrong_type_is_an_error() {
        let mut map = snapshot_properties();
        map.insert("ReadyToUse".to_string(), value("yes".to_string()));
        assert_eq!(
            properties(map).snapshot().expect_err("an error"),
            "vmsnapd's snapshot /org/vmsnap/VmSnap1/snapshot/s1 has property ReadyToUse of \
             type 's', expected 'b'"
        );
        // Optional or not: ErrorName of the wrong type is not taken for a missing one.
        let mut map = snapshot_properties();
        map.insert("ErrorName".to_string(), value(7u32));
        assert_eq!(
            properties(map).snapshot().expect_err("an error"),
            "vmsnapd's snapshot /org/vmsnap/VmSnap1/snapshot/s1 has property ErrorName of \
             type 'u', expected 's'"
        );
    }

    #[test]
    fn a_structure_of_other_fields_is_an_error_not_a_panic() {
        let mut map = snapshot_properties();
        // (ss) where (ssst) is expected: converted unchecked, this would panic.
        map.insert(
            "IncludedVolumes".to_string(),
            value(vec![("vda".to_string(), "qcow2".to_string())]),
        );
        assert_eq!(
            properties(map).snapshot().expect_err("an error"),
            "vmsnapd's snapshot /org/vmsnap/VmSnap1/snapshot/s1 has property IncludedVolumes \
             of type 'a(ss)', expected 'a(ssst)'"
        );
    }

    #[test]
    fn restore_from_properties() {
        let r = crate::kube::model::tests::restore();
        let mut map = HashMap::new();
        map.insert("Uuid".to_string(), value(r.uuid.clone()));
        map.insert("VmName".to_string(), value(r.vm.clone()));
        map.insert("Snapshot".to_string(), value(r.snapshot.clone()));
        map.insert("Target".to_string(), value(r.target.clone()));
        map.insert("NewVm".to_string(), value(r.new_vm));
        map.insert("Phase".to_string(), value(r.phase.clone()));
        map.insert("Complete".to_string(), value(r.complete));
        map.insert("CreationTime".to_string(), value(r.creation_time.clone()));
        map.insert("RestoreTime".to_string(), value(r.restore_time.clone()));
        let restores: Vec<(String, String, String)> = r
            .restores
            .iter()
            .map(|v| (v.target.clone(), v.from_image.clone(), v.to_image.clone()))
            .collect();
        map.insert("Restores".to_string(), value(restores));
        map.insert(
            "DetachedDisks".to_string(),
            value(vec![("vdb".to_string(), "/extra.qcow2".to_string())]),
        );
        map.insert(
            "NotRestored".to_string(),
            value(vec![("sda".to_string(), "cdrom".to_string())]),
        );
        map.insert(
            "SafetySnapshot".to_string(),
            value(r.safety_snapshot.clone()),
        );
        map.insert("Error".to_string(), value(r.error.clone()));
        map.insert("Progress".to_string(), value(r.progress.clone()));
        map.insert("Name".to_string(), value("my-vmrestore".to_string()));
        let mut p = Properties::new("restore /r".into(), map);
        let restore = p.restore().expect("reads");
        assert_eq!(p.restore_name().expect("reads"), "my-vmrestore");
        // ErrorName was left out, as by a vmsnapd older than it: empty.
        let expected = Restore {
            detached_disks: vec![DetachedDisk {
                target: "vdb".into(),
                source: "/extra.qcow2".into(),
            }],
            not_restored: vec![ExcludedVolume {
                target: "sda".into(),
                reason: "cdrom".into(),
            }],
            ..r
        };
        assert_eq!(restore, expected);
    }

    /// The typed properties vmsnapd serves for kube::model's test snapshot.
    fn typed_snapshot_properties() -> SnapshotProperties {
        let s = expected_snapshot();
        SnapshotProperties {
            name: Some(s.name),
            description: Some(s.description),
            vm_name: Some(s.vm),
            vm_uuid: Some(s.vm_uuid),
            uuid: Some(s.uuid),
            phase: Some(s.phase),
            ready_to_use: Some(s.ready_to_use),
            creation_time: Some(s.creation_time),
            source_indications: Some(vec![SourceIndication {
                indication: "Online".into(),
                message: "the VM was running".into(),
            }]),
            indications: Some(s.indications),
            included_volumes: Some(s.included_volumes),
            excluded_volumes: Some(s.excluded_volumes),
            error: Some(s.error),
            error_name: Some(s.error_name),
            progress: Some(s.progress),
            freeze_duration_ms: Some(s.freeze_duration_ms),
            frozen_filesystems: Some(s.frozen_filesystems),
            cow_fill_percent: Some(s.cow_fill_percent),
        }
    }

    #[test]
    fn typed_snapshot_reads_as_the_generic_one() {
        let object = "snapshot /org/vmsnap/VmSnap1/snapshot/s1".to_string();
        let mut typed = Properties::typed_snapshot(object, typed_snapshot_properties());
        let mut generic = properties(snapshot_properties());
        assert_eq!(
            typed.snapshot().expect("reads"),
            generic.snapshot().expect("reads")
        );
        assert_eq!(
            typed.source_indications().expect("reads"),
            generic.source_indications().expect("reads")
        );
    }

    #[test]
    fn typed_snapshot_missing_a_property_says_which() {
        let object = "snapshot /org/vmsnap/VmSnap1/snapshot/s1".to_string();
        let mut p = typed_snapshot_properties();
        p.cow_fill_percent = None;
        p.error_name = None;
        let error = Properties::typed_snapshot(object.clone(), p)
            .snapshot()
            .expect_err("an error");
        assert_eq!(
            error,
            "vmsnapd's snapshot /org/vmsnap/VmSnap1/snapshot/s1 has no property CowFillPercent \
             (is vmsnapd older than vmsnapctl?)"
        );
        // ErrorName is optional (older vmsnapd): empty.
        let mut p = typed_snapshot_properties();
        p.error_name = None;
        let snapshot = Properties::typed_snapshot(object, p)
            .snapshot()
            .expect("reads");
        assert_eq!(snapshot.error_name, "");
    }

    #[test]
    fn typed_objects_take_by_path() {
        let path = OwnedObjectPath::try_from("/org/vmsnap/VmSnap1/snapshot/s1").expect("path");
        let mut interfaces = HashMap::new();
        interfaces.insert(SNAPSHOT_INTERFACE.to_string(), typed_snapshot_properties());
        let mut map = HashMap::new();
        map.insert(path.clone(), interfaces);
        let mut objects = Objects::Snapshots(map);
        let mut p = objects.take_snapshot(&path).expect("there");
        assert_eq!(p.snapshot().expect("reads"), expected_snapshot());
        assert!(objects.take_snapshot(&path).is_none(), "taken once");
    }

    #[test]
    fn a_vanished_object_is_none() {
        let path = OwnedObjectPath::try_from("/org/vmsnap/VmSnap1/snapshot/gone").expect("path");
        let mut objects = Objects::new(ManagedObjects::new());
        assert!(objects.take_snapshot(&path).is_none());
    }
}
