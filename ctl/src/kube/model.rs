//! vmsnap's snapshots and restores as KubeVirt's objects: VirtualMachineSnapshot,
//! VirtualMachineSnapshotContent and VirtualMachineRestore of `snapshot.kubevirt.io/v1beta1`,
//! with KubeVirt's field names. Keys are written in alphabetical order, as kubectl prints them.

use serde_json::{json, Map, Value};
use vmsnap_api::SourceIndication;

use crate::restore_output::Restore;
use crate::snapshot_output::Snapshot;

/// The API group of the objects.
pub const GROUP: &str = "snapshot.kubevirt.io";
/// The apiVersion vmsnapctl writes.
pub const API_VERSION: &str = "snapshot.kubevirt.io/v1beta1";
/// The apiVersions vmsnapctl reads.
pub const API_VERSIONS: [&str; 2] = [
    "snapshot.kubevirt.io/v1alpha1",
    "snapshot.kubevirt.io/v1beta1",
];
/// API group and kind of a snapshot's source and a restore's target.
pub const VM_API_GROUP: &str = "kubevirt.io";
pub const VM_KIND: &str = "VirtualMachine";

/// Annotation carrying a snapshot's free-form description.
pub const ANNOTATION_DESCRIPTION: &str = "snapshot.vmsnap.org/description";
/// Annotation that acknowledges excluded disks (`"true"`): the snapshot is taken without the
/// disks vmsnap cannot capture (`vmsnapctl snapshot create --allow-excluded`).
pub const ANNOTATION_ALLOW_EXCLUDED: &str = "snapshot.vmsnap.org/allow-excluded";
/// Annotation of a restore naming the VM whose snapshot it restored (informative).
pub const ANNOTATION_SOURCE_VM: &str = "snapshot.vmsnap.org/source-vm";
/// Annotation of a restore naming the safety snapshot taken before it (informative).
pub const ANNOTATION_SAFETY_SNAPSHOT: &str = "snapshot.vmsnap.org/safety-snapshot";

/// The three kinds of objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Snapshot,
    Content,
    Restore,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Snapshot, Kind::Content, Kind::Restore];

    /// The `kind` field.
    pub const fn kind(self) -> &'static str {
        match self {
            Kind::Snapshot => "VirtualMachineSnapshot",
            Kind::Content => "VirtualMachineSnapshotContent",
            Kind::Restore => "VirtualMachineRestore",
        }
    }

    /// Singular resource name, as `-o name` and `apply` print it with the group.
    pub const fn singular(self) -> &'static str {
        match self {
            Kind::Snapshot => "virtualmachinesnapshot",
            Kind::Content => "virtualmachinesnapshotcontent",
            Kind::Restore => "virtualmachinerestore",
        }
    }

    pub const fn plural(self) -> &'static str {
        match self {
            Kind::Snapshot => "virtualmachinesnapshots",
            Kind::Content => "virtualmachinesnapshotcontents",
            Kind::Restore => "virtualmachinerestores",
        }
    }

    /// `virtualmachinesnapshot.snapshot.kubevirt.io/NAME`.
    pub fn qualified_name(self, name: &str) -> String {
        format!("{}.{GROUP}/{name}", self.singular())
    }

    /// `virtualmachinesnapshots.snapshot.kubevirt.io "NAME" not found`, kubectl's words.
    pub fn not_found(self, name: &str) -> String {
        format!("{}.{GROUP} {name:?} not found", self.plural())
    }

    /// The kind a resource word names, as kubectl accepts them: the short names (`vmsnapshot`,
    /// `vmsnapshotcontent`, `vmrestore`), singular and plural, and the full names with or
    /// without the group, in any case.
    pub fn from_resource(word: &str) -> Option<Kind> {
        let word = word.to_ascii_lowercase();
        let word = word
            .strip_suffix(&format!(".{GROUP}"))
            .unwrap_or(word.as_str())
            .to_string();
        Kind::ALL.into_iter().find(|kind| {
            let short = match kind {
                Kind::Snapshot => "vmsnapshot",
                Kind::Content => "vmsnapshotcontent",
                Kind::Restore => "vmrestore",
            };
            word == short
                || word == format!("{short}s")
                || word == kind.singular()
                || word == kind.plural()
                || word == kind.kind().to_ascii_lowercase()
        })
    }

    /// The kind a manifest's `kind` field names.
    pub fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == kind)
    }
}

/// The name of a snapshot's content object, as KubeVirt names it.
pub fn content_name(snapshot_uuid: &str) -> String {
    format!("vmsnapshot-content-{snapshot_uuid}")
}

fn condition(kind: &str, status: bool, reason: &str, message: &str, time: &str) -> Value {
    json!({
        "lastProbeTime": Value::Null,
        "lastTransitionTime": non_empty(time),
        "message": message,
        "reason": reason,
        "status": if status { "True" } else { "False" },
        "type": kind,
    })
}

fn non_empty(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_string())
    }
}

/// The message KubeVirt-style clients show for an indication.
pub fn indication_message(indication: &str, snapshot: &Snapshot) -> String {
    match indication {
        "Online" => "the VM was running when the snapshot was taken".to_string(),
        "GuestAgent" => format!(
            "the guest agent froze the guest's filesystems for {} ms ({} filesystems)",
            snapshot.freeze_duration_ms, snapshot.frozen_filesystems
        ),
        "NoGuestAgent" => {
            "no guest agent was connected: the snapshot is crash-consistent".to_string()
        }
        "QuiesceFailed" => {
            "the guest agent could not freeze the filesystems: the snapshot is crash-consistent"
                .to_string()
        }
        "QuiesceTimeout" => {
            "the guest agent did not answer the freeze in time: the snapshot is crash-consistent"
                .to_string()
        }
        "Paused" => "the VM was paused: its disks were consistent without a freeze".to_string(),
        "PartialSnapshot" => format!(
            "disks left out: {}",
            snapshot
                .excluded_volumes
                .iter()
                .map(|v| format!("{} ({})", v.target, v.reason))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// The indications of a snapshot, with `PartialSnapshot` when disks were excluded.
pub fn indications(snapshot: &Snapshot) -> Vec<String> {
    let mut list = snapshot.indications.clone();
    if !snapshot.excluded_volumes.is_empty() && !list.iter().any(|i| i == "PartialSnapshot") {
        list.push("PartialSnapshot".to_string());
    }
    list
}

/// A snapshot as a VirtualMachineSnapshot. `messages` are vmsnapd's messages for its
/// indications (empty: vmsnapctl's own words are used).
pub fn snapshot_object(s: &Snapshot, messages: &[SourceIndication]) -> Value {
    let mut annotations = Map::new();
    if !s.description.is_empty() {
        annotations.insert(ANNOTATION_DESCRIPTION.into(), json!(s.description));
    }
    if !s.excluded_volumes.is_empty() {
        annotations.insert(ANNOTATION_ALLOW_EXCLUDED.into(), json!("true"));
    }
    let mut metadata = Map::new();
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), Value::Object(annotations));
    }
    metadata.insert("creationTimestamp".into(), non_empty(&s.creation_time));
    metadata.insert("name".into(), json!(s.name));
    metadata.insert("uid".into(), json!(s.uuid));

    let failed = s.phase == "Failed";
    let progressing = s.phase == "InProgress" || s.phase == "Deleting";
    let mut conditions = vec![
        condition(
            "Progressing",
            progressing,
            if progressing {
                "In progress"
            } else {
                "Operation complete"
            },
            if progressing { &s.progress } else { "" },
            &s.creation_time,
        ),
        condition(
            "Ready",
            s.ready_to_use,
            if s.ready_to_use {
                "Operation complete"
            } else if failed {
                "Failed"
            } else {
                "Not ready"
            },
            "",
            &s.creation_time,
        ),
    ];
    if failed {
        conditions.push(condition(
            "Failure",
            true,
            "Failed",
            &s.error,
            &s.creation_time,
        ));
    }
    let indications = indications(s);
    let source_indications: Vec<Value> = indications
        .iter()
        .map(|i| {
            let message = messages
                .iter()
                .find(|m| &m.indication == i)
                .map(|m| m.message.clone())
                .unwrap_or_else(|| indication_message(i, s));
            json!({"indication": i, "message": message})
        })
        .collect();

    let mut status = Map::new();
    status.insert("conditions".into(), Value::Array(conditions));
    status.insert("creationTime".into(), non_empty(&s.creation_time));
    if !s.error.is_empty() {
        status.insert(
            "error".into(),
            json!({"message": s.error, "time": non_empty(&s.creation_time)}),
        );
    }
    status.insert("indications".into(), json!(indications));
    status.insert("phase".into(), json!(s.phase));
    status.insert("readyToUse".into(), json!(s.ready_to_use));
    status.insert(
        "snapshotVolumes".into(),
        json!({
            "excludedVolumes": s.excluded_volumes.iter().map(|v| &v.target).collect::<Vec<_>>(),
            "includedVolumes": s.included_volumes.iter().map(|v| &v.target).collect::<Vec<_>>(),
        }),
    );
    status.insert("sourceIndications".into(), Value::Array(source_indications));
    status.insert("sourceUID".into(), json!(s.vm_uuid));
    status.insert(
        "virtualMachineSnapshotContentName".into(),
        json!(content_name(&s.uuid)),
    );

    json!({
        "apiVersion": API_VERSION,
        "kind": Kind::Snapshot.kind(),
        "metadata": Value::Object(metadata),
        "spec": {
            "source": {"apiGroup": VM_API_GROUP, "kind": VM_KIND, "name": s.vm},
        },
        "status": Value::Object(status),
    })
}

/// A snapshot's content record as a VirtualMachineSnapshotContent: the recorded definition
/// (when vmsnapd serves it) and one volume backup per captured disk.
pub fn content_object(s: &Snapshot, domain_xml: Option<&str>) -> Value {
    let mut virtual_machine = Map::new();
    if let Some(xml) = domain_xml {
        virtual_machine.insert("domainXML".into(), json!(xml));
    }
    virtual_machine.insert("name".into(), json!(s.vm));
    virtual_machine.insert("uid".into(), json!(s.vm_uuid));
    let backups: Vec<Value> = s
        .included_volumes
        .iter()
        .map(|v| {
            json!({
                "backend": v.backend,
                "image": v.image,
                "virtualSize": v.virtual_size,
                "volumeName": v.target,
            })
        })
        .collect();
    let mut status = Map::new();
    status.insert("creationTime".into(), non_empty(&s.creation_time));
    if !s.error.is_empty() {
        status.insert(
            "error".into(),
            json!({"message": s.error, "time": non_empty(&s.creation_time)}),
        );
    }
    status.insert("readyToUse".into(), json!(s.ready_to_use));
    json!({
        "apiVersion": API_VERSION,
        "kind": Kind::Content.kind(),
        "metadata": {
            "creationTimestamp": non_empty(&s.creation_time),
            "name": content_name(&s.uuid),
            "uid": s.uuid,
        },
        "spec": {
            "source": {"virtualMachine": Value::Object(virtual_machine)},
            "virtualMachineSnapshotName": s.name,
            "volumeBackups": backups,
        },
        "status": Value::Object(status),
    })
}

/// A restore's name: the name it was applied with, or its UUID.
pub fn restore_name<'a>(restore: &'a Restore, name: &'a str) -> &'a str {
    if name.is_empty() {
        &restore.uuid
    } else {
        name
    }
}

/// A restore as a VirtualMachineRestore. `name` is the name it was applied with (empty for
/// one made by `vmsnapctl restore`, which is then named by its UUID).
pub fn restore_object(r: &Restore, name: &str) -> Value {
    let mut annotations = Map::new();
    if !r.vm.is_empty() {
        annotations.insert(ANNOTATION_SOURCE_VM.into(), json!(r.vm));
    }
    if !r.safety_snapshot.is_empty() {
        annotations.insert(ANNOTATION_SAFETY_SNAPSHOT.into(), json!(r.safety_snapshot));
    }
    let failed = r.phase == "Failed";
    let progressing = r.phase == "InProgress" || r.phase == "Waiting";
    let transition = if r.restore_time.is_empty() {
        &r.creation_time
    } else {
        &r.restore_time
    };
    let mut conditions = vec![
        condition(
            "Progressing",
            progressing,
            if progressing {
                "In progress"
            } else {
                "Operation complete"
            },
            if progressing { &r.progress } else { "" },
            transition,
        ),
        condition(
            "Ready",
            r.complete,
            if r.complete {
                "Operation complete"
            } else if failed {
                "Failed"
            } else {
                "Not ready"
            },
            "",
            transition,
        ),
    ];
    if failed {
        conditions.push(condition("Failure", true, "Failed", &r.error, transition));
    }
    let restores: Vec<Value> = r
        .restores
        .iter()
        .map(|v| json!({"fromImage": v.from_image, "toImage": v.to_image, "volumeName": v.target}))
        .collect();
    let mut status = Map::new();
    status.insert("complete".into(), json!(r.complete));
    status.insert("conditions".into(), Value::Array(conditions));
    if !r.detached_disks.is_empty() {
        status.insert(
            "detachedVolumes".into(),
            json!(r
                .detached_disks
                .iter()
                .map(|d| json!({"source": d.source, "volumeName": d.target}))
                .collect::<Vec<_>>()),
        );
    }
    if !r.error.is_empty() {
        status.insert(
            "error".into(),
            json!({"message": r.error, "time": non_empty(transition)}),
        );
    }
    if !r.not_restored.is_empty() {
        status.insert(
            "notRestoredVolumes".into(),
            json!(r
                .not_restored
                .iter()
                .map(|d| json!({"reason": d.reason, "volumeName": d.target}))
                .collect::<Vec<_>>()),
        );
    }
    status.insert("phase".into(), json!(r.phase));
    status.insert("restoreTime".into(), non_empty(&r.restore_time));
    status.insert("restores".into(), Value::Array(restores));

    let mut metadata = Map::new();
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), Value::Object(annotations));
    }
    metadata.insert("creationTimestamp".into(), non_empty(&r.creation_time));
    metadata.insert("name".into(), json!(restore_name(r, name)));
    metadata.insert("uid".into(), json!(r.uuid));
    json!({
        "apiVersion": API_VERSION,
        "kind": Kind::Restore.kind(),
        "metadata": Value::Object(metadata),
        "spec": {
            "target": {"apiGroup": VM_API_GROUP, "kind": VM_KIND, "name": r.target},
            "virtualMachineSnapshotName": r.snapshot,
        },
        "status": Value::Object(status),
    })
}

/// Several objects as kubectl prints them: a `List`.
pub fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "items": items, "kind": "List", "metadata": {"resourceVersion": ""}})
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use vmsnap_api::{ExcludedVolume, IncludedVolume, VolumeRestore};

    pub fn snapshot() -> Snapshot {
        Snapshot {
            name: "my-vmsnapshot".into(),
            uuid: "5c1d7a9e-0000-4000-8000-000000000001".into(),
            vm: "my-vm".into(),
            vm_uuid: "0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11".into(),
            description: "before the upgrade".into(),
            phase: "Succeeded".into(),
            ready_to_use: true,
            creation_time: "2026-11-26T14:03:12Z".into(),
            indications: vec!["Online".into(), "GuestAgent".into()],
            included_volumes: vec![IncludedVolume {
                target: "vda".into(),
                backend: "qcow2".into(),
                image: "/var/lib/libvirt/images/my-vm.qcow2".into(),
                virtual_size: 1 << 30,
            }],
            excluded_volumes: vec![ExcludedVolume {
                target: "sda".into(),
                reason: "cdrom".into(),
            }],
            error: String::new(),
            error_name: String::new(),
            progress: String::new(),
            freeze_duration_ms: 57,
            frozen_filesystems: 1,
            cow_fill_percent: 0.0,
        }
    }

    pub fn restore() -> Restore {
        Restore {
            uuid: "7e3f1c2a-0000-4000-8000-000000000002".into(),
            vm: "my-vm".into(),
            snapshot: "my-vmsnapshot".into(),
            target: "my-vm".into(),
            new_vm: false,
            phase: "Succeeded".into(),
            complete: true,
            creation_time: "2026-11-26T15:00:00Z".into(),
            restore_time: "2026-11-26T15:00:02Z".into(),
            restores: vec![VolumeRestore {
                target: "vda".into(),
                from_image: "/a.qcow2".into(),
                to_image: "/b.qcow2".into(),
            }],
            detached_disks: vec![],
            not_restored: vec![],
            safety_snapshot: "pre-restore-20261126T150000Z".into(),
            error: String::new(),
            error_name: String::new(),
            progress: String::new(),
        }
    }

    #[test]
    fn snapshot_object_has_kubevirts_fields() {
        let object = snapshot_object(&snapshot(), &[]);
        assert_eq!(object["apiVersion"], "snapshot.kubevirt.io/v1beta1");
        assert_eq!(object["kind"], "VirtualMachineSnapshot");
        assert_eq!(object["metadata"]["name"], "my-vmsnapshot");
        assert_eq!(
            object["metadata"]["uid"],
            "5c1d7a9e-0000-4000-8000-000000000001"
        );
        assert_eq!(
            object["metadata"]["creationTimestamp"],
            "2026-11-26T14:03:12Z"
        );
        assert_eq!(
            object["metadata"]["annotations"][ANNOTATION_DESCRIPTION],
            "before the upgrade"
        );
        assert_eq!(
            object["metadata"]["annotations"][ANNOTATION_ALLOW_EXCLUDED],
            "true"
        );
        assert_eq!(
            object["spec"],
            json!({"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "my-vm"}})
        );
        let status = &object["status"];
        assert_eq!(status["phase"], "Succeeded");
        assert_eq!(status["readyToUse"], true);
        assert_eq!(status["sourceUID"], "0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11");
        assert_eq!(
            status["virtualMachineSnapshotContentName"],
            "vmsnapshot-content-5c1d7a9e-0000-4000-8000-000000000001"
        );
        assert_eq!(
            status["snapshotVolumes"],
            json!({"includedVolumes": ["vda"], "excludedVolumes": ["sda"]})
        );
        assert_eq!(
            status["indications"],
            json!(["Online", "GuestAgent", "PartialSnapshot"])
        );
        assert_eq!(
            status["sourceIndications"][2],
            json!({"indication": "PartialSnapshot", "message": "disks left out: sda (cdrom)"})
        );
        let types: Vec<&str> = status["conditions"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["type"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(types, ["Progressing", "Ready"]);
        assert_eq!(status["conditions"][1]["status"], "True");
        assert!(status.get("error").is_none());
    }

    #[test]
    fn failed_snapshot_has_error_and_failure_condition() {
        let mut s = snapshot();
        s.phase = "Failed".into();
        s.ready_to_use = false;
        s.error = "the guest agent did not answer".into();
        let object = snapshot_object(&s, &[]);
        assert_eq!(
            object["status"]["error"],
            json!({"message": "the guest agent did not answer", "time": "2026-11-26T14:03:12Z"})
        );
        assert_eq!(object["status"]["conditions"][2]["type"], "Failure");
        assert_eq!(object["status"]["conditions"][2]["status"], "True");
        assert_eq!(object["status"]["conditions"][1]["status"], "False");
    }

    #[test]
    fn content_object_lists_volume_backups() {
        let object = content_object(&snapshot(), Some("<domain/>"));
        assert_eq!(object["kind"], "VirtualMachineSnapshotContent");
        assert_eq!(
            object["metadata"]["name"],
            "vmsnapshot-content-5c1d7a9e-0000-4000-8000-000000000001"
        );
        assert_eq!(
            object["spec"]["virtualMachineSnapshotName"],
            "my-vmsnapshot"
        );
        assert_eq!(
            object["spec"]["source"]["virtualMachine"]["domainXML"],
            "<domain/>"
        );
        assert_eq!(
            object["spec"]["volumeBackups"],
            json!([{"backend": "qcow2", "image": "/var/lib/libvirt/images/my-vm.qcow2",
                    "virtualSize": 1073741824u64, "volumeName": "vda"}])
        );
    }

    #[test]
    fn restore_object_has_kubevirts_fields() {
        let object = restore_object(&restore(), "my-vmrestore");
        assert_eq!(object["kind"], "VirtualMachineRestore");
        assert_eq!(object["metadata"]["name"], "my-vmrestore");
        assert_eq!(
            object["spec"],
            json!({"target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "my-vm"},
                   "virtualMachineSnapshotName": "my-vmsnapshot"})
        );
        assert_eq!(object["status"]["complete"], true);
        assert_eq!(object["status"]["restoreTime"], "2026-11-26T15:00:02Z");
        assert_eq!(
            object["status"]["restores"],
            json!([{"volumeName": "vda", "fromImage": "/a.qcow2", "toImage": "/b.qcow2"}])
        );
        // Without an applied name, the UUID names it.
        assert_eq!(
            restore_object(&restore(), "")["metadata"]["name"],
            "7e3f1c2a-0000-4000-8000-000000000002"
        );
    }

    #[test]
    fn resource_words() {
        for word in [
            "vmsnapshot",
            "vmsnapshots",
            "virtualmachinesnapshot",
            "VirtualMachineSnapshots",
            "virtualmachinesnapshots.snapshot.kubevirt.io",
            "VirtualMachineSnapshot",
        ] {
            assert_eq!(Kind::from_resource(word), Some(Kind::Snapshot), "{word}");
        }
        for word in [
            "vmsnapshotcontent",
            "vmsnapshotcontents",
            "virtualmachinesnapshotcontent",
        ] {
            assert_eq!(Kind::from_resource(word), Some(Kind::Content), "{word}");
        }
        for word in [
            "vmrestore",
            "vmrestores",
            "virtualmachinerestores.snapshot.kubevirt.io",
        ] {
            assert_eq!(Kind::from_resource(word), Some(Kind::Restore), "{word}");
        }
        for word in ["vm", "snapshot", "pods", ""] {
            assert_eq!(Kind::from_resource(word), None, "{word}");
        }
        assert_eq!(
            Kind::Snapshot.qualified_name("x"),
            "virtualmachinesnapshot.snapshot.kubevirt.io/x"
        );
        assert_eq!(
            Kind::Restore.not_found("x"),
            "virtualmachinerestores.snapshot.kubevirt.io \"x\" not found"
        );
    }
}
