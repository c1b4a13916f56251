//! Rendering of snapshots: a table and a detailed layout for people, JSON for scripts.
//!
//! The JSON field names follow KubeVirt's VirtualMachineSnapshot (`readyToUse`, `creationTime`,
//! `indications`, `snapshotVolumes.includedVolumes`/`excludedVolumes`) where KubeVirt has a name
//! for the thing; they are part of vmsnapctl's interface.

use serde::Serialize;
use vmsnap_api::{terminal_safe, ExcludedVolume, IncludedVolume};

use crate::output::{dash, none_if_empty, yes_no};
use crate::show::{self, Layout, WhenEmpty};
use crate::OutputFormat;

/// A snapshot as vmsnapctl reads it from vmsnapd: every property of the Snapshot interface.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub name: String,
    pub uuid: String,
    pub vm: String,
    pub vm_uuid: String,
    pub description: String,
    pub phase: String,
    pub ready_to_use: bool,
    pub creation_time: String,
    pub indications: Vec<String>,
    pub included_volumes: Vec<IncludedVolume>,
    pub excluded_volumes: Vec<ExcludedVolume>,
    pub error: String,
    /// The D-Bus error name of `error` (empty from a vmsnapd that does not report it).
    pub error_name: String,
    pub progress: String,
    pub freeze_duration_ms: u64,
    pub frozen_filesystems: u32,
    /// The fullest thick LVM copy-on-write space, percent.
    pub cow_fill_percent: f64,
}

impl From<vmsnap_api::SnapshotRow> for Snapshot {
    fn from(row: vmsnap_api::SnapshotRow) -> Snapshot {
        Snapshot {
            name: row.name,
            uuid: row.uuid,
            vm: row.vm_name,
            vm_uuid: row.vm_uuid,
            description: row.description,
            phase: row.phase,
            ready_to_use: row.ready_to_use,
            creation_time: row.creation_time,
            indications: row.indications,
            included_volumes: row.included_volumes,
            excluded_volumes: row.excluded_volumes,
            error: row.error,
            error_name: row.error_name,
            progress: row.progress,
            freeze_duration_ms: row.freeze_duration_ms,
            frozen_filesystems: row.frozen_filesystems,
            cow_fill_percent: row.cow_fill_percent,
        }
    }
}

/// The JSON form of a snapshot.
#[derive(Debug, Serialize)]
pub struct SnapshotJson<'a> {
    #[serde(rename = "name")]
    name: &'a str,
    #[serde(rename = "uuid")]
    uuid: &'a str,
    #[serde(rename = "vm")]
    vm: &'a str,
    #[serde(rename = "vmUuid")]
    vm_uuid: &'a str,
    #[serde(rename = "description")]
    description: &'a str,
    #[serde(rename = "phase")]
    phase: &'a str,
    #[serde(rename = "readyToUse")]
    ready_to_use: bool,
    /// RFC 3339; null while vmsnapd has not set it.
    #[serde(rename = "creationTime")]
    creation_time: Option<&'a str>,
    #[serde(rename = "indications")]
    indications: &'a [String],
    #[serde(rename = "snapshotVolumes")]
    snapshot_volumes: SnapshotVolumesJson<'a>,
    /// Why the snapshot failed; null when it did not.
    #[serde(rename = "error")]
    error: Option<&'a str>,
    /// The D-Bus error name of `error` (org.vmsnap.VmSnap1.Error.StorageFailed, ...); null
    /// without one.
    #[serde(rename = "errorName")]
    error_name: Option<&'a str>,
    #[serde(rename = "freezeDurationMs")]
    freeze_duration_ms: u64,
    #[serde(rename = "frozenFilesystems")]
    frozen_filesystems: u32,
    /// The fullest copy-on-write space of its thick LVM volumes, percent (0: none).
    #[serde(rename = "cowFillPercent")]
    cow_fill_percent: f64,
}

#[derive(Debug, Serialize)]
struct SnapshotVolumesJson<'a> {
    #[serde(rename = "includedVolumes")]
    included_volumes: Vec<IncludedVolumeJson<'a>>,
    #[serde(rename = "excludedVolumes")]
    excluded_volumes: Vec<ExcludedVolumeJson<'a>>,
}

#[derive(Debug, Serialize)]
struct IncludedVolumeJson<'a> {
    #[serde(rename = "target")]
    target: &'a str,
    #[serde(rename = "backend")]
    backend: &'a str,
    #[serde(rename = "image")]
    image: &'a str,
    /// Bytes.
    #[serde(rename = "virtualSize")]
    virtual_size: u64,
}

#[derive(Debug, Serialize)]
struct ExcludedVolumeJson<'a> {
    #[serde(rename = "target")]
    target: &'a str,
    #[serde(rename = "reason")]
    reason: &'a str,
}

impl Snapshot {
    pub fn to_json(&self) -> SnapshotJson<'_> {
        SnapshotJson {
            name: &self.name,
            uuid: &self.uuid,
            vm: &self.vm,
            vm_uuid: &self.vm_uuid,
            description: &self.description,
            phase: &self.phase,
            ready_to_use: self.ready_to_use,
            creation_time: none_if_empty(&self.creation_time),
            indications: &self.indications,
            snapshot_volumes: SnapshotVolumesJson {
                included_volumes: self
                    .included_volumes
                    .iter()
                    .map(|v| IncludedVolumeJson {
                        target: &v.target,
                        backend: &v.backend,
                        image: &v.image,
                        virtual_size: v.virtual_size,
                    })
                    .collect(),
                excluded_volumes: self
                    .excluded_volumes
                    .iter()
                    .map(|v| ExcludedVolumeJson {
                        target: &v.target,
                        reason: &v.reason,
                    })
                    .collect(),
            },
            error: none_if_empty(&self.error),
            error_name: none_if_empty(&self.error_name),
            freeze_duration_ms: self.freeze_duration_ms,
            frozen_filesystems: self.frozen_filesystems,
            cow_fill_percent: self.cow_fill_percent,
        }
    }
}

/// What `snapshot delete` reports.
#[derive(Debug, Serialize)]
pub struct Deleted<'a> {
    #[serde(rename = "name")]
    pub name: &'a str,
    #[serde(rename = "vm")]
    pub vm: &'a str,
    /// True once the snapshot is gone; false with --no-wait (the deletion was only started).
    #[serde(rename = "deleted")]
    pub deleted: bool,
}

pub fn print_snapshot_list(snapshots: &[Snapshot], format: OutputFormat) -> Result<(), String> {
    show::print_list(format, snapshots, Snapshot::to_json, render_list)
}

pub fn print_snapshot(snapshot: &Snapshot, format: OutputFormat) -> Result<(), String> {
    show::print(format, || snapshot.to_json(), || render_show(snapshot))
}

pub fn print_deleted(deleted: &Deleted<'_>, format: OutputFormat) -> Result<(), String> {
    show::print(format, || deleted, || render_deleted(deleted))
}

/// What `snapshot delete` says: one line.
pub fn render_deleted(deleted: &Deleted<'_>) -> String {
    let (name, vm) = (terminal_safe(deleted.name), terminal_safe(deleted.vm));
    if deleted.deleted {
        format!("Deleted snapshot {name} of {vm}\n")
    } else {
        format!("Deleting snapshot {name} of {vm}; vmsnapd finishes in the background\n")
    }
}

/// The `snapshot list` table.
pub fn render_list(snapshots: &[Snapshot]) -> String {
    show::table_of(
        &["NAME", "VM", "PHASE", "READY", "CREATED", "INDICATIONS"],
        snapshots,
        |s| {
            vec![
                s.name.clone(),
                s.vm.clone(),
                s.phase.clone(),
                yes_no(s.ready_to_use).to_string(),
                dash(&s.creation_time),
                dash(&s.indications.join(",")),
            ]
        },
    )
}

/// Width of the labels of `snapshot show`, colon and padding included.
const LABEL_WIDTH: usize = 16;

/// The `snapshot show` layout.
pub fn render_show(s: &Snapshot) -> String {
    let mut show = Layout::new(LABEL_WIDTH);
    show.field("Name", &s.name);
    show.field("VM", &s.vm);
    show.field("UUID", &s.uuid);
    show.field_or_dash("Description", &s.description);
    show.field("Phase", &s.phase);
    show.field_if_set("Progress", &s.progress);
    show.field("Ready", yes_no(s.ready_to_use));
    show.field_or_dash("Created", &s.creation_time);
    show.field_or_dash("Indications", &s.indications.join(", "));
    show.field(
        "Freeze window",
        &freeze_window(s.freeze_duration_ms, s.frozen_filesystems),
    );
    if s.cow_fill_percent > 0.0 {
        show.field(
            "COW space used",
            &format!(
                "{:.1}% (thick LVM snapshot; invalid at 100%)",
                s.cow_fill_percent
            ),
        );
    }
    show.multiline_if_set("Error", &s.error);
    show.table(
        "Included volumes",
        &["TARGET", "BACKEND", "VIRTUAL SIZE", "IMAGE"],
        &s.included_volumes,
        |v| {
            vec![
                v.target.clone(),
                v.backend.clone(),
                human_size(v.virtual_size),
                dash(&v.image),
            ]
        },
        WhenEmpty::SayNone,
    );
    show.table(
        "Excluded volumes",
        &["TARGET", "REASON"],
        &s.excluded_volumes,
        |v| vec![v.target.clone(), dash(&v.reason)],
        WhenEmpty::Omit,
    );
    show.finish()
}

/// "57 ms (2 filesystems)", or "none" when the guest was not frozen.
pub fn freeze_window(duration_ms: u64, filesystems: u32) -> String {
    if duration_ms == 0 && filesystems == 0 {
        return "none".to_string();
    }
    let plural = if filesystems == 1 { "" } else { "s" };
    format!("{duration_ms} ms ({filesystems} filesystem{plural})")
}

/// Bytes in binary units with one decimal: "512 B", "1.5 KiB", "1.0 GiB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // 1023.95 and above would print as "1024.0": show the next unit instead.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let name = UNITS.get(unit).copied().unwrap_or("EiB");
    format!("{value:.1} {name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            name: "before-upgrade".into(),
            uuid: "5c1d7a9e-0000-4000-8000-000000000001".into(),
            vm: "web".into(),
            vm_uuid: "0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11".into(),
            description: "before the kernel upgrade".into(),
            phase: "Succeeded".into(),
            ready_to_use: true,
            creation_time: "2026-11-26T14:03:12Z".into(),
            indications: vec!["Online".into(), "GuestAgent".into()],
            included_volumes: vec![
                IncludedVolume {
                    target: "vda".into(),
                    backend: "qcow2".into(),
                    image: "/var/lib/libvirt/images/web.qcow2".into(),
                    virtual_size: 1 << 30,
                },
                IncludedVolume {
                    target: "vdb".into(),
                    backend: "lvm".into(),
                    image: "/dev/vg0/web-data-snap".into(),
                    virtual_size: 20 * (1 << 30) + (1 << 29),
                },
            ],
            excluded_volumes: vec![ExcludedVolume {
                target: "sda".into(),
                reason: "cdrom".into(),
            }],
            error: String::new(),
            error_name: String::new(),
            progress: String::new(),
            freeze_duration_ms: 57,
            frozen_filesystems: 2,
            cow_fill_percent: 0.0,
        }
    }

    #[test]
    fn json_field_names_are_stable() {
        let json = serde_json::to_value(sample().to_json()).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "name": "before-upgrade",
                "uuid": "5c1d7a9e-0000-4000-8000-000000000001",
                "vm": "web",
                "vmUuid": "0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11",
                "description": "before the kernel upgrade",
                "phase": "Succeeded",
                "readyToUse": true,
                "creationTime": "2026-11-26T14:03:12Z",
                "indications": ["Online", "GuestAgent"],
                "snapshotVolumes": {
                    "includedVolumes": [
                        {"target": "vda", "backend": "qcow2",
                         "image": "/var/lib/libvirt/images/web.qcow2", "virtualSize": 1073741824u64},
                        {"target": "vdb", "backend": "lvm",
                         "image": "/dev/vg0/web-data-snap", "virtualSize": 22011707392u64}
                    ],
                    "excludedVolumes": [{"target": "sda", "reason": "cdrom"}]
                },
                "error": null,
                "errorName": null,
                "freezeDurationMs": 57,
                "frozenFilesystems": 2,
                "cowFillPercent": 0.0
            })
        );
    }

    #[test]
    fn json_field_order_is_the_documented_one() {
        let text = serde_json::to_string(&sample().to_json()).expect("serializes");
        let keys = [
            "\"name\"",
            "\"uuid\"",
            "\"vm\"",
            "\"vmUuid\"",
            "\"description\"",
            "\"phase\"",
            "\"readyToUse\"",
            "\"creationTime\"",
            "\"indications\"",
            "\"snapshotVolumes\"",
            "\"error\"",
            "\"freezeDurationMs\"",
            "\"frozenFilesystems\"",
        ];
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| text.find(k).unwrap_or(usize::MAX))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn json_of_a_failed_snapshot_in_progress_fields() {
        let mut s = sample();
        s.phase = "Failed".into();
        s.ready_to_use = false;
        s.creation_time = String::new();
        s.error = "qemu refused the overlay".into();
        s.included_volumes.clear();
        s.excluded_volumes.clear();
        let json = serde_json::to_value(s.to_json()).expect("serializes");
        assert_eq!(json["error"], "qemu refused the overlay");
        assert_eq!(json["creationTime"], serde_json::Value::Null);
        assert_eq!(
            json["snapshotVolumes"],
            serde_json::json!({"includedVolumes": [], "excludedVolumes": []})
        );
    }

    #[test]
    fn list_json_is_an_array_of_snapshots() {
        let list = [sample(), sample()];
        let json: Vec<SnapshotJson<'_>> = list.iter().map(Snapshot::to_json).collect();
        let value = serde_json::to_value(&json).expect("serializes");
        assert_eq!(value.as_array().map(Vec::len), Some(2));
        assert_eq!(value[1]["readyToUse"], true);
    }

    #[test]
    fn deleted_json() {
        let deleted = Deleted {
            name: "before-upgrade",
            vm: "web",
            deleted: true,
        };
        assert_eq!(
            serde_json::to_value(&deleted).expect("serializes"),
            serde_json::json!({"name": "before-upgrade", "vm": "web", "deleted": true})
        );
    }

    #[test]
    fn deleted_text() {
        let mut deleted = Deleted {
            name: "before-upgrade",
            vm: "web\u{1b}[2K",
            deleted: true,
        };
        assert_eq!(
            render_deleted(&deleted),
            "Deleted snapshot before-upgrade of web\\u{1b}[2K\n"
        );
        deleted.deleted = false;
        assert_eq!(
            render_deleted(&deleted),
            "Deleting snapshot before-upgrade of web\\u{1b}[2K; vmsnapd finishes in the background\n"
        );
    }

    #[test]
    fn list_table() {
        let mut second = sample();
        second.name = "nightly".into();
        second.vm = "db".into();
        second.phase = "InProgress".into();
        second.ready_to_use = false;
        second.creation_time = String::new();
        second.indications.clear();
        assert_eq!(
            render_list(&[sample(), second]),
            "NAME            VM   PHASE       READY  CREATED               INDICATIONS\n\
             before-upgrade  web  Succeeded   yes    2026-11-26T14:03:12Z  Online,GuestAgent\n\
             nightly         db   InProgress  no     -                     -\n"
        );
    }

    #[test]
    fn show_layout() {
        assert_eq!(
            render_show(&sample()),
            "Name:           before-upgrade\n\
             VM:             web\n\
             UUID:           5c1d7a9e-0000-4000-8000-000000000001\n\
             Description:    before the kernel upgrade\n\
             Phase:          Succeeded\n\
             Ready:          yes\n\
             Created:        2026-11-26T14:03:12Z\n\
             Indications:    Online, GuestAgent\n\
             Freeze window:  57 ms (2 filesystems)\n\
             Included volumes:\n\
             \x20 TARGET  BACKEND  VIRTUAL SIZE  IMAGE\n\
             \x20 vda     qcow2    1.0 GiB       /var/lib/libvirt/images/web.qcow2\n\
             \x20 vdb     lvm      20.5 GiB      /dev/vg0/web-data-snap\n\
             Excluded volumes:\n\
             \x20 TARGET  REASON\n\
             \x20 sda     cdrom\n"
        );
    }

    #[test]
    fn hostile_values_cannot_forge_lines_or_send_escapes() {
        let mut hostile = sample();
        hostile.name = "web\u{1b}]0;owned\u{7}".into();
        hostile.description = "x\nPhase:          Succeeded\r\u{1b}[2K\u{202e}".into();
        hostile.error = "line one\nPhase:          Succeeded".into();
        hostile.excluded_volumes[0].reason = "cdrom\nvdz     qcow2".into();
        for text in [render_show(&hostile), render_list(&[hostile.clone()])] {
            assert!(
                !text
                    .chars()
                    .any(|c| vmsnap_api::is_unsafe_char(c) && c != '\n'),
                "{text:?}"
            );
            // Exactly one line starts with "Phase:" (the real one) in the show layout.
            assert!(
                text.lines().filter(|l| l.starts_with("Phase:")).count() <= 1,
                "{text}"
            );
            assert!(
                !text.lines().any(|l| l.trim_start().starts_with("vdz")),
                "{text}"
            );
        }
        let show = render_show(&hostile);
        assert!(
            show.contains("Description:    x\\nPhase:          Succeeded\\r\\u{1b}[2K\\u{202e}\n")
        );
        // A multi-line error keeps its lines, each indented under the first.
        assert!(
            show.contains("Error:          line one\n                Phase:"),
            "{show}"
        );
    }

    #[test]
    fn show_layout_of_a_failed_snapshot() {
        let mut s = sample();
        s.phase = "Failed".into();
        s.ready_to_use = false;
        s.description = String::new();
        s.indications = vec!["Online".into(), "NoGuestAgent".into()];
        s.freeze_duration_ms = 0;
        s.frozen_filesystems = 0;
        s.error = "cannot create the overlay\nof vda".into();
        s.included_volumes.clear();
        s.excluded_volumes.clear();
        assert_eq!(
            render_show(&s),
            "Name:           before-upgrade\n\
             VM:             web\n\
             UUID:           5c1d7a9e-0000-4000-8000-000000000001\n\
             Description:    -\n\
             Phase:          Failed\n\
             Ready:          no\n\
             Created:        2026-11-26T14:03:12Z\n\
             Indications:    Online, NoGuestAgent\n\
             Freeze window:  none\n\
             Error:          cannot create the overlay\n\
             \x20               of vda\n\
             Included volumes: none\n"
        );
    }

    #[test]
    fn show_layout_in_progress() {
        let mut s = sample();
        s.phase = "InProgress".into();
        s.progress = "freezing filesystems".into();
        let text = render_show(&s);
        assert!(
            text.contains("Phase:          InProgress\nProgress:       freezing filesystems\n"),
            "{text}"
        );
    }

    #[test]
    fn show_layout_with_every_optional_field() {
        let mut s = sample();
        s.phase = "InProgress".into();
        s.progress = "copying vdb".into();
        s.ready_to_use = false;
        s.cow_fill_percent = 42.25;
        s.error = "one\ntwo".into();
        s.excluded_volumes.clear();
        assert_eq!(
            render_show(&s),
            "Name:           before-upgrade\n\
             VM:             web\n\
             UUID:           5c1d7a9e-0000-4000-8000-000000000001\n\
             Description:    before the kernel upgrade\n\
             Phase:          InProgress\n\
             Progress:       copying vdb\n\
             Ready:          no\n\
             Created:        2026-11-26T14:03:12Z\n\
             Indications:    Online, GuestAgent\n\
             Freeze window:  57 ms (2 filesystems)\n\
             COW space used: 42.2% (thick LVM snapshot; invalid at 100%)\n\
             Error:          one\n\
             \x20               two\n\
             Included volumes:\n\
             \x20 TARGET  BACKEND  VIRTUAL SIZE  IMAGE\n\
             \x20 vda     qcow2    1.0 GiB       /var/lib/libvirt/images/web.qcow2\n\
             \x20 vdb     lvm      20.5 GiB      /dev/vg0/web-data-snap\n"
        );
    }

    #[test]
    fn show_layout_of_empty_values() {
        let mut s = sample();
        s.name = String::new();
        s.uuid = String::new();
        s.creation_time = String::new();
        s.indications.clear();
        s.included_volumes[0].image = String::new();
        s.included_volumes.truncate(1);
        s.excluded_volumes[0].reason = String::new();
        assert_eq!(
            render_show(&s),
            "Name:\n\
             VM:             web\n\
             UUID:\n\
             Description:    before the kernel upgrade\n\
             Phase:          Succeeded\n\
             Ready:          yes\n\
             Created:        -\n\
             Indications:    -\n\
             Freeze window:  57 ms (2 filesystems)\n\
             Included volumes:\n\
             \x20 TARGET  BACKEND  VIRTUAL SIZE  IMAGE\n\
             \x20 vda     qcow2    1.0 GiB       -\n\
             Excluded volumes:\n\
             \x20 TARGET  REASON\n\
             \x20 sda     -\n"
        );
    }

    #[test]
    fn freeze_windows() {
        assert_eq!(freeze_window(57, 2), "57 ms (2 filesystems)");
        assert_eq!(freeze_window(3, 1), "3 ms (1 filesystem)");
        assert_eq!(freeze_window(0, 0), "none");
        assert_eq!(freeze_window(0, 1), "0 ms (1 filesystem)");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(1 << 20), "1.0 MiB");
        assert_eq!(human_size(1 << 30), "1.0 GiB");
        assert_eq!(human_size(10 * (1 << 30) + (1 << 29)), "10.5 GiB");
        assert_eq!(human_size((1 << 30) - 1), "1.0 GiB");
        assert_eq!(human_size(1023 * (1 << 20)), "1023.0 MiB");
        assert_eq!(human_size(1 << 40), "1.0 TiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }
}
