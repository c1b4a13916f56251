//! The objects of a listing in one call: the manager's GetSnapshotObjects and
//! GetRestoreObjects (shaped as GetManagedObjects' reply, `a{oa{sa{sv}}}`, for just those
//! objects), and the [`Snapshot`] and [`Restore`] values built
//! from the property maps. Lists read this instead of one GetAll per object.
//!
//! A property that a vmsnapd older than it lacks reads as its empty value; any other property
//! that is missing, or one of the wrong type, is an error naming the object and the property.

use std::collections::HashMap;

use vmsnap_api::{
    DetachedDisk, ExcludedVolume, IncludedVolume, SourceIndication, VolumeRestore,
    RESTORE_INTERFACE, SNAPSHOT_INTERFACE,
};
use zbus::fdo::ManagedObjects;
use zbus::names::InterfaceName;
use zbus::{OwnedObjectPath, OwnedVariant, Type};

use crate::restore_output::Restore;
use crate::snapshot_output::Snapshot;

/// The objects of one GetSnapshotObjects or GetRestoreObjects reply.
pub struct Objects(ManagedObjects);

impl Objects {
    pub fn new(objects: ManagedObjects) -> Objects {
        Objects(objects)
    }

    /// Takes the properties of `interface` on the object at `path` out of the reply; `None`
    /// when the object (or that interface of it) is not there: it was removed after it was
    /// listed.
    fn take(&mut self, path: &OwnedObjectPath, interface: &'static str) -> Option<Properties> {
        let interfaces = self.0.get_mut(path)?;
        let name = InterfaceName::from_static_str(interface).ok()?;
        let map = interfaces.remove(&name)?;
        let kind = if interface == SNAPSHOT_INTERFACE {
            "snapshot"
        } else {
            "restore"
        };
        Some(Properties {
            object: format!("{kind} {}", path.as_str()),
            map,
        })
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
    map: HashMap<String, OwnedVariant>,
}

impl Properties {
    #[cfg(test)]
    pub fn new(object: String, map: HashMap<String, OwnedVariant>) -> Properties {
        Properties { object, map }
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
        let Some(value) = self.map.remove(name) else {
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
        self.optional_string("Name")
    }

    /// The snapshot these are the properties of, as `snapshot list` and `show` print it.
    pub fn snapshot(&mut self) -> Result<Snapshot, String> {
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

    #[test]
    fn a_vanished_object_is_none() {
        let path = OwnedObjectPath::try_from("/org/vmsnap/VmSnap1/snapshot/gone").expect("path");
        let mut objects = Objects::new(ManagedObjects::new());
        assert!(objects.take_snapshot(&path).is_none());
    }
}
