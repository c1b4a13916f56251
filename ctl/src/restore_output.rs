//! Rendering of restores: a table and a detailed layout for people, JSON for scripts.
//!
//! The JSON field names follow KubeVirt's VirtualMachineRestore status (`complete`,
//! `restoreTime`, `restores[].…`, `phase`) where KubeVirt has a name for the thing; they are part
//! of vmsnapctl's interface.

use serde::Serialize;
use vmsnap_api::{DetachedDisk, ExcludedVolume, VolumeRestore};

use crate::output::{dash, none_if_empty, yes_no};
use crate::show::{self, Layout, WhenEmpty};
use crate::OutputFormat;

/// A restore as vmsnapctl reads it from vmsnapd: every property of the Restore interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub uuid: String,
    /// The VM the snapshot belongs to.
    pub vm: String,
    pub snapshot: String,
    /// The VM restored: `vm` itself, or the new VM.
    pub target: String,
    pub new_vm: bool,
    pub phase: String,
    pub complete: bool,
    pub creation_time: String,
    pub restore_time: String,
    pub restores: Vec<VolumeRestore>,
    pub detached_disks: Vec<DetachedDisk>,
    pub not_restored: Vec<ExcludedVolume>,
    pub safety_snapshot: String,
    pub error: String,
    /// The D-Bus error name of `error` (empty from a vmsnapd that does not report it).
    pub error_name: String,
    pub progress: String,
}

/// The JSON form of a restore.
#[derive(Debug, Serialize)]
pub struct RestoreJson<'a> {
    #[serde(rename = "uuid")]
    uuid: &'a str,
    #[serde(rename = "vm")]
    vm: &'a str,
    #[serde(rename = "snapshot")]
    snapshot: &'a str,
    #[serde(rename = "target")]
    target: &'a str,
    #[serde(rename = "newVm")]
    new_vm: bool,
    #[serde(rename = "phase")]
    phase: &'a str,
    #[serde(rename = "complete")]
    complete: bool,
    /// RFC 3339; null while vmsnapd has not set it.
    #[serde(rename = "creationTime")]
    creation_time: Option<&'a str>,
    /// RFC 3339; null until the restore has completed.
    #[serde(rename = "restoreTime")]
    restore_time: Option<&'a str>,
    #[serde(rename = "restores")]
    restores: Vec<VolumeRestoreJson<'a>>,
    #[serde(rename = "detachedDisks")]
    detached_disks: Vec<DetachedDiskJson<'a>>,
    #[serde(rename = "notRestored")]
    not_restored: Vec<NotRestoredJson<'a>>,
    /// Name of the snapshot taken of the state before the restore; null if none.
    #[serde(rename = "safetySnapshot")]
    safety_snapshot: Option<&'a str>,
    /// Why the restore failed; null when it did not.
    #[serde(rename = "error")]
    error: Option<&'a str>,
    /// The D-Bus error name of `error` (org.vmsnap.VmSnap1.Error.StorageFailed, ...); null
    /// without one.
    #[serde(rename = "errorName")]
    error_name: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct VolumeRestoreJson<'a> {
    #[serde(rename = "target")]
    target: &'a str,
    #[serde(rename = "fromImage")]
    from_image: &'a str,
    #[serde(rename = "toImage")]
    to_image: &'a str,
}

#[derive(Debug, Serialize)]
struct DetachedDiskJson<'a> {
    #[serde(rename = "target")]
    target: &'a str,
    #[serde(rename = "source")]
    source: &'a str,
}

#[derive(Debug, Serialize)]
struct NotRestoredJson<'a> {
    #[serde(rename = "target")]
    target: &'a str,
    #[serde(rename = "reason")]
    reason: &'a str,
}

impl Restore {
    pub fn to_json(&self) -> RestoreJson<'_> {
        RestoreJson {
            uuid: &self.uuid,
            vm: &self.vm,
            snapshot: &self.snapshot,
            target: &self.target,
            new_vm: self.new_vm,
            phase: &self.phase,
            complete: self.complete,
            creation_time: none_if_empty(&self.creation_time),
            restore_time: none_if_empty(&self.restore_time),
            restores: self
                .restores
                .iter()
                .map(|r| VolumeRestoreJson {
                    target: &r.target,
                    from_image: &r.from_image,
                    to_image: &r.to_image,
                })
                .collect(),
            detached_disks: self
                .detached_disks
                .iter()
                .map(|d| DetachedDiskJson {
                    target: &d.target,
                    source: &d.source,
                })
                .collect(),
            not_restored: self
                .not_restored
                .iter()
                .map(|v| NotRestoredJson {
                    target: &v.target,
                    reason: &v.reason,
                })
                .collect(),
            safety_snapshot: none_if_empty(&self.safety_snapshot),
            error: none_if_empty(&self.error),
            error_name: none_if_empty(&self.error_name),
        }
    }

    /// The first 8 characters of the UUID: what `restore list` shows, and enough for
    /// `restore show` in practice.
    pub fn short_uuid(&self) -> String {
        short_uuid(&self.uuid)
    }
}

pub fn short_uuid(uuid: &str) -> String {
    uuid.chars().take(8).collect()
}

pub fn print_restore_list(restores: &[Restore], format: OutputFormat) -> Result<(), String> {
    show::print_list(format, restores, Restore::to_json, render_list)
}

pub fn print_restore(restore: &Restore, format: OutputFormat) -> Result<(), String> {
    show::print(format, || restore.to_json(), || render_show(restore))
}

/// The `restore list` table.
pub fn render_list(restores: &[Restore]) -> String {
    show::table_of(
        &[
            "UUID", "VM", "SNAPSHOT", "TARGET", "PHASE", "COMPLETE", "RESTORED",
        ],
        restores,
        |r| {
            vec![
                r.short_uuid(),
                r.vm.clone(),
                r.snapshot.clone(),
                dash(&r.target),
                r.phase.clone(),
                yes_no(r.complete).to_string(),
                dash(&r.restore_time),
            ]
        },
    )
}

/// Width of the labels of `restore show`, colon and padding included.
const LABEL_WIDTH: usize = 18;

/// Heading of the disks an in-place restore detached.
pub const DETACHED_HEADING: &str =
    "Detached disks (attached after the snapshot; detached, image untouched)";

/// Heading of the disks the snapshot did not capture.
pub const NOT_RESTORED_HEADING: &str =
    "Not restored (excluded from the snapshot: content not captured)";

/// The `restore show` layout.
pub fn render_show(r: &Restore) -> String {
    let mut show = Layout::new(LABEL_WIDTH);
    show.field("UUID", &r.uuid);
    show.field("VM", &r.vm);
    show.field("Snapshot", &r.snapshot);
    if r.new_vm {
        show.field("Target", &format!("{} (new VM)", dash(&r.target)));
    } else {
        show.field_or_dash("Target", &r.target);
    }
    show.field("Phase", &r.phase);
    show.field_if_set("Progress", &r.progress);
    show.field("Complete", yes_no(r.complete));
    show.field_or_dash("Created", &r.creation_time);
    show.field_or_dash("Restored", &r.restore_time);
    show.field_or_dash("Safety snapshot", &r.safety_snapshot);
    show.multiline_if_set("Error", &r.error);
    show.table(
        "Restored disks",
        &["TARGET", "FROM", "TO"],
        &r.restores,
        |v| vec![v.target.clone(), dash(&v.from_image), dash(&v.to_image)],
        WhenEmpty::SayNone,
    );
    show.table(
        DETACHED_HEADING,
        &["TARGET", "SOURCE"],
        &r.detached_disks,
        |d| vec![d.target.clone(), dash(&d.source)],
        WhenEmpty::Omit,
    );
    show.table(
        NOT_RESTORED_HEADING,
        &["TARGET", "REASON"],
        &r.not_restored,
        |v| vec![v.target.clone(), dash(&v.reason)],
        WhenEmpty::Omit,
    );
    show.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Restore {
        Restore {
            uuid: "7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182".into(),
            vm: "web".into(),
            snapshot: "before-upgrade".into(),
            target: "web".into(),
            new_vm: false,
            phase: "Succeeded".into(),
            complete: true,
            creation_time: "2026-11-26T15:00:00Z".into(),
            restore_time: "2026-11-26T15:00:07Z".into(),
            restores: vec![VolumeRestore {
                target: "vda".into(),
                from_image: "/var/lib/libvirt/images/web.qcow2".into(),
                to_image: "/var/lib/libvirt/images/web.restore-7e3f1c2a.qcow2".into(),
            }],
            detached_disks: vec![DetachedDisk {
                target: "vdc".into(),
                source: "/var/lib/libvirt/images/web-scratch.qcow2".into(),
            }],
            not_restored: vec![ExcludedVolume {
                target: "sda".into(),
                reason: "cdrom".into(),
            }],
            safety_snapshot: "pre-restore-20261126T150000Z".into(),
            error: String::new(),
            error_name: String::new(),
            progress: String::new(),
        }
    }

    #[test]
    fn json_field_names_are_stable() {
        let json = serde_json::to_value(sample().to_json()).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "uuid": "7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182",
                "vm": "web",
                "snapshot": "before-upgrade",
                "target": "web",
                "newVm": false,
                "phase": "Succeeded",
                "complete": true,
                "creationTime": "2026-11-26T15:00:00Z",
                "restoreTime": "2026-11-26T15:00:07Z",
                "restores": [{
                    "target": "vda",
                    "fromImage": "/var/lib/libvirt/images/web.qcow2",
                    "toImage": "/var/lib/libvirt/images/web.restore-7e3f1c2a.qcow2"
                }],
                "detachedDisks": [{
                    "target": "vdc",
                    "source": "/var/lib/libvirt/images/web-scratch.qcow2"
                }],
                "notRestored": [{"target": "sda", "reason": "cdrom"}],
                "safetySnapshot": "pre-restore-20261126T150000Z",
                "error": null,
                "errorName": null
            })
        );
    }

    #[test]
    fn json_field_order_is_the_documented_one() {
        let text = serde_json::to_string(&sample().to_json()).expect("serializes");
        let keys = [
            "\"uuid\"",
            "\"vm\"",
            "\"snapshot\"",
            "\"target\"",
            "\"newVm\"",
            "\"phase\"",
            "\"complete\"",
            "\"creationTime\"",
            "\"restoreTime\"",
            "\"restores\"",
            "\"detachedDisks\"",
            "\"notRestored\"",
            "\"safetySnapshot\"",
            "\"error\"",
        ];
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| text.find(k).unwrap_or(usize::MAX))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn json_of_a_failed_restore_has_nulls_for_what_is_unset() {
        let mut r = sample();
        r.phase = "Failed".into();
        r.complete = false;
        r.restore_time = String::new();
        r.safety_snapshot = String::new();
        r.error = "cannot create the overlay of vda".into();
        r.restores.clear();
        r.detached_disks.clear();
        r.not_restored.clear();
        let json = serde_json::to_value(r.to_json()).expect("serializes");
        assert_eq!(json["error"], "cannot create the overlay of vda");
        assert_eq!(json["restoreTime"], serde_json::Value::Null);
        assert_eq!(json["safetySnapshot"], serde_json::Value::Null);
        assert_eq!(json["complete"], false);
        assert_eq!(json["restores"], serde_json::json!([]));
        assert_eq!(json["detachedDisks"], serde_json::json!([]));
        assert_eq!(json["notRestored"], serde_json::json!([]));
    }

    #[test]
    fn list_json_is_an_array_of_restores() {
        let list = [sample(), sample()];
        let json: Vec<RestoreJson<'_>> = list.iter().map(Restore::to_json).collect();
        let value = serde_json::to_value(&json).expect("serializes");
        assert_eq!(value.as_array().map(Vec::len), Some(2));
        assert_eq!(value[1]["complete"], true);
    }

    #[test]
    fn list_table() {
        let mut second = sample();
        second.uuid = "0badc0de-0000-4000-8000-000000000002".into();
        second.vm = "db".into();
        second.snapshot = "nightly".into();
        second.target = "db-copy".into();
        second.new_vm = true;
        second.phase = "InProgress".into();
        second.complete = false;
        second.restore_time = String::new();
        assert_eq!(
            render_list(&[sample(), second]),
            "UUID      VM   SNAPSHOT        TARGET   PHASE       COMPLETE  RESTORED\n\
             7e3f1c2a  web  before-upgrade  web      Succeeded   yes       2026-11-26T15:00:07Z\n\
             0badc0de  db   nightly         db-copy  InProgress  no        -\n"
        );
    }

    #[test]
    fn list_table_when_empty() {
        assert_eq!(
            render_list(&[]),
            "UUID  VM  SNAPSHOT  TARGET  PHASE  COMPLETE  RESTORED\n"
        );
    }

    #[test]
    fn show_layout() {
        assert_eq!(
            render_show(&sample()),
            "UUID:             7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182\n\
             VM:               web\n\
             Snapshot:         before-upgrade\n\
             Target:           web\n\
             Phase:            Succeeded\n\
             Complete:         yes\n\
             Created:          2026-11-26T15:00:00Z\n\
             Restored:         2026-11-26T15:00:07Z\n\
             Safety snapshot:  pre-restore-20261126T150000Z\n\
             Restored disks:\n\
             \x20 TARGET  FROM                               TO\n\
             \x20 vda     /var/lib/libvirt/images/web.qcow2  \
             /var/lib/libvirt/images/web.restore-7e3f1c2a.qcow2\n\
             Detached disks (attached after the snapshot; detached, image untouched):\n\
             \x20 TARGET  SOURCE\n\
             \x20 vdc     /var/lib/libvirt/images/web-scratch.qcow2\n\
             Not restored (excluded from the snapshot: content not captured):\n\
             \x20 TARGET  REASON\n\
             \x20 sda     cdrom\n"
        );
    }

    #[test]
    fn show_layout_of_a_new_vm_in_progress() {
        let mut r = sample();
        r.target = "web-copy".into();
        r.new_vm = true;
        r.phase = "InProgress".into();
        r.progress = "creating overlays".into();
        r.complete = false;
        r.restore_time = String::new();
        r.safety_snapshot = String::new();
        r.restores.clear();
        r.detached_disks.clear();
        r.not_restored.clear();
        assert_eq!(
            render_show(&r),
            "UUID:             7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182\n\
             VM:               web\n\
             Snapshot:         before-upgrade\n\
             Target:           web-copy (new VM)\n\
             Phase:            InProgress\n\
             Progress:         creating overlays\n\
             Complete:         no\n\
             Created:          2026-11-26T15:00:00Z\n\
             Restored:         -\n\
             Safety snapshot:  -\n\
             Restored disks: none\n"
        );
    }

    #[test]
    fn show_layout_of_a_failed_restore() {
        let mut r = sample();
        r.phase = "Failed".into();
        r.complete = false;
        r.restore_time = String::new();
        r.error = "cannot define the VM:\nlibvirt said no".into();
        r.restores.clear();
        r.detached_disks.clear();
        let text = render_show(&r);
        assert!(
            text.contains(
                "Safety snapshot:  pre-restore-20261126T150000Z\n\
                 Error:            cannot define the VM:\n\
                 \x20                 libvirt said no\n\
                 Restored disks: none\n\
                 Not restored (excluded from the snapshot: content not captured):\n"
            ),
            "{text}"
        );
        assert!(!text.contains("Detached disks"), "{text}");
    }

    #[test]
    fn show_layout_of_a_failed_restore_in_full() {
        let mut r = sample();
        r.target = String::new();
        r.new_vm = true;
        r.phase = "Failed".into();
        r.progress = "removing overlays".into();
        r.complete = false;
        r.restore_time = String::new();
        r.error = "cannot define the VM:\nlibvirt said no".into();
        r.restores[0].to_image = String::new();
        r.not_restored.clear();
        assert_eq!(
            render_show(&r),
            "UUID:             7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182\n\
             VM:               web\n\
             Snapshot:         before-upgrade\n\
             Target:           - (new VM)\n\
             Phase:            Failed\n\
             Progress:         removing overlays\n\
             Complete:         no\n\
             Created:          2026-11-26T15:00:00Z\n\
             Restored:         -\n\
             Safety snapshot:  pre-restore-20261126T150000Z\n\
             Error:            cannot define the VM:\n\
             \x20                 libvirt said no\n\
             Restored disks:\n\
             \x20 TARGET  FROM                               TO\n\
             \x20 vda     /var/lib/libvirt/images/web.qcow2  -\n\
             Detached disks (attached after the snapshot; detached, image untouched):\n\
             \x20 TARGET  SOURCE\n\
             \x20 vdc     /var/lib/libvirt/images/web-scratch.qcow2\n"
        );
    }

    #[test]
    fn short_uuids() {
        assert_eq!(sample().short_uuid(), "7e3f1c2a");
        assert_eq!(short_uuid("abc"), "abc");
        assert_eq!(short_uuid(""), "");
    }
}
