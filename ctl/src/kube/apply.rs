//! `vmsnapctl apply -f FILE|-`: VirtualMachineSnapshot and VirtualMachineRestore manifests.
//!
//! Every document is read and checked first; a bad one refuses the whole file and nothing is
//! done. Then each object is planned against what vmsnapd has (created, unchanged, or refused as
//! a change of an immutable spec) and, when every plan is sound, carried out in order. Like
//! `oc apply`, apply does not wait for the snapshot or restore to finish: `vmsnapctl wait` does.

use std::collections::HashMap;
use std::io::Read;

use clap::Args;
use vmsnap_api::VmSnapError;
use zbus::{OwnedVariant, Variant};

use super::manifest::{
    self, ContentManifest, Manifest, ReadinessPolicy, RestoreManifest, SnapshotManifest,
};
use super::model::Kind;
use super::read::{self, RestoreItem, SnapshotItem};
use crate::bus::Bus;
use crate::Failure;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The manifest: a YAML or JSON file, or - for standard input. It may hold several
    /// documents (separated by ---) and `kind: List`.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<String>,
}

/// Reads a file, or standard input for `-`.
pub fn read_source(file: &str) -> Result<String, String> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))
    }
}

/// What applying one object does.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Unchanged,
    CreateSnapshot(SnapshotManifest),
    /// Restore `vm`'s snapshot into `manifest.target`; `in_place` when it is `vm` itself.
    CreateRestore {
        manifest: RestoreManifest,
        vm: String,
        in_place: bool,
    },
}

/// Plans a snapshot against the snapshots vmsnapd has.
pub fn plan_snapshot(m: &SnapshotManifest, existing: &[SnapshotItem]) -> Result<Plan, String> {
    let same_name: Vec<&SnapshotItem> = existing
        .iter()
        .filter(|i| i.snapshot.name == m.name)
        .collect();
    let mine = same_name
        .iter()
        .find(|i| i.snapshot.vm == m.vm || i.snapshot.vm_uuid == m.vm);
    if let Some(item) = mine {
        let description = m.description.as_deref().unwrap_or("");
        if description != item.snapshot.description {
            return Err(format!(
                "VirtualMachineSnapshot {:?}: the description annotation cannot be changed \
                 (it is {:?})",
                m.name, item.snapshot.description
            ));
        }
        return Ok(Plan::Unchanged);
    }
    if let Some(other) = same_name.first() {
        return Err(format!(
            "VirtualMachineSnapshot {:?} is invalid: spec.source.name: spec is immutable \
             (it exists with source {:?})",
            m.name, other.snapshot.vm
        ));
    }
    Ok(Plan::CreateSnapshot(m.clone()))
}

/// Plans a snapshot content: it exists with its snapshot (unchanged) or cannot be made.
pub fn plan_content(m: &ContentManifest, existing: &[SnapshotItem]) -> Result<Plan, String> {
    let found = existing
        .iter()
        .find(|i| super::model::content_name(&i.snapshot.uuid) == m.name);
    match found {
        Some(item)
            if m.snapshot
                .as_deref()
                .is_none_or(|s| s == item.snapshot.name) =>
        {
            Ok(Plan::Unchanged)
        }
        Some(item) => Err(format!(
            "VirtualMachineSnapshotContent {:?} is invalid: spec.virtualMachineSnapshotName: \
             spec is immutable (it is {:?})",
            m.name, item.snapshot.name
        )),
        None => Err(format!(
            "VirtualMachineSnapshotContent {:?} cannot be created: vmsnapd records a content \
             with each VirtualMachineSnapshot (apply the snapshot)",
            m.name
        )),
    }
}

/// Plans a restore. `vm_exists` tells whether a VM of that name exists.
pub fn plan_restore(
    m: &RestoreManifest,
    restores: &[RestoreItem],
    snapshots: &[SnapshotItem],
    vm_exists: impl Fn(&str) -> bool,
) -> Result<Plan, String> {
    if let Some(item) = restores.iter().find(|r| r.name() == m.name) {
        let r = &item.restore;
        if r.snapshot == m.snapshot && r.target == m.target {
            return Ok(Plan::Unchanged);
        }
        return Err(format!(
            "VirtualMachineRestore {:?} is invalid: spec: spec is immutable (it restores \
             snapshot {:?} into {:?})",
            m.name, r.snapshot, r.target
        ));
    }
    let candidates: Vec<&SnapshotItem> = snapshots
        .iter()
        .filter(|s| s.snapshot.name == m.snapshot)
        .collect();
    let source = match candidates.as_slice() {
        [] => return Err(Kind::Snapshot.not_found(&m.snapshot)),
        [one] => *one,
        several => match several.iter().find(|s| s.snapshot.vm == m.target) {
            // In place: the target's own snapshot of that name.
            Some(own) => *own,
            None => {
                let vms: Vec<&str> = several.iter().map(|s| s.snapshot.vm.as_str()).collect();
                return Err(format!(
                    "VirtualMachineRestore {:?}: spec.virtualMachineSnapshotName {:?} is \
                     ambiguous: VMs {} each have a snapshot of that name",
                    m.name,
                    m.snapshot,
                    vms.join(", ")
                ));
            }
        },
    };
    let vm = source.snapshot.vm.clone();
    if m.target == vm || m.target == source.snapshot.vm_uuid {
        return Ok(Plan::CreateRestore {
            manifest: m.clone(),
            vm,
            in_place: true,
        });
    }
    if vm_exists(&m.target) {
        return Err(format!(
            "VirtualMachineRestore {:?}: spec.target.name {:?} is another existing VM; a \
             restore goes into the snapshot's VM ({vm:?}) or into a VM that does not exist yet",
            m.name, m.target
        ));
    }
    Ok(Plan::CreateRestore {
        manifest: m.clone(),
        vm,
        in_place: false,
    })
}

fn string_option(value: &str, what: &str) -> Result<OwnedVariant, String> {
    OwnedVariant::try_from(Variant::from(value)).map_err(|e| format!("cannot encode {what}: {e}"))
}

pub fn snapshot_options(
    m: &SnapshotManifest,
) -> Result<HashMap<&'static str, OwnedVariant>, String> {
    let mut options = crate::snapshot::create_options(m.description.as_deref(), m.allow_excluded)?;
    if let Some(deadline) = m.failure_deadline {
        let ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        options.insert("failure_deadline_ms", OwnedVariant::from(ms));
    }
    Ok(options)
}

pub fn restore_options(
    m: &RestoreManifest,
    in_place: bool,
) -> Result<HashMap<&'static str, OwnedVariant>, String> {
    let mut options = HashMap::new();
    options.insert("name", string_option(&m.name, "the restore's name")?);
    if in_place {
        options.insert(
            "readiness_policy",
            string_option(m.readiness.as_str(), "the readiness policy")?,
        );
    } else {
        options.insert("target", string_option(&m.target, "the target's name")?);
    }
    Ok(options)
}

async fn vm_exists(bus: &Bus, name: &str) -> Result<bool, String> {
    let manager = bus.manager().await?;
    match manager.find_vm(name).await {
        Ok(_) => Ok(true),
        Err(VmSnapError::NotFound(_)) => Ok(false),
        Err(e) => Err(bus.describe_api(e)),
    }
}

/// Plans every manifest against vmsnapd's objects, in order; a manifest planned earlier in
/// the same file counts as existing for the later ones.
pub async fn plan_all(bus: &Bus, manifests: &[Manifest]) -> Result<Vec<Plan>, String> {
    let (snapshots, restores) = read::snapshots_and_restores(bus).await?;
    let mut existing_vms = HashMap::new();
    for m in manifests {
        if let Manifest::Restore(r) = m {
            if !existing_vms.contains_key(&r.target) {
                existing_vms.insert(r.target.clone(), vm_exists(bus, &r.target).await?);
            }
        }
    }
    let mut plans: Vec<Plan> = Vec::new();
    let mut seen: Vec<(Kind, String)> = Vec::new();
    for m in manifests {
        let key = (m.kind(), m.name().to_string());
        if seen.contains(&key) {
            return Err(format!(
                "{} {:?} appears twice in the input",
                m.kind().kind(),
                m.name()
            ));
        }
        seen.push(key);
        let plan = match m {
            Manifest::Snapshot(s) => plan_snapshot(s, &snapshots)?,
            Manifest::Content(c) => plan_content(c, &snapshots)?,
            Manifest::Restore(r) => {
                // A snapshot created earlier in this input is not yet there: refer to it.
                let planned_here = plans
                    .iter()
                    .any(|p| matches!(p, Plan::CreateSnapshot(s) if s.name == r.snapshot));
                if planned_here && !snapshots.iter().any(|s| s.snapshot.name == r.snapshot) {
                    return Err(format!(
                        "VirtualMachineRestore {:?} refers to snapshot {:?} created by the \
                         same apply; apply the restore once the snapshot is Ready \
                         (vmsnapctl wait --for=condition=Ready vmsnapshot/{})",
                        r.name, r.snapshot, r.snapshot
                    ));
                }
                plan_restore(r, &restores, &snapshots, |name| {
                    existing_vms.get(name).copied().unwrap_or(false)
                })?
            }
        };
        plans.push(plan);
    }
    Ok(plans)
}

async fn carry_out(bus: &Bus, plan: &Plan) -> Result<&'static str, String> {
    let manager = bus.manager().await?;
    match plan {
        Plan::Unchanged => Ok("unchanged"),
        Plan::CreateSnapshot(m) => {
            manager
                .create_snapshot(&m.vm, &m.name, snapshot_options(m)?)
                .await
                .map_err(|e| match e {
                    VmSnapError::ExcludedDisks(message) => format!(
                        "{message} (acknowledge them with the annotation \
                         {}: \"true\")",
                        super::model::ANNOTATION_ALLOW_EXCLUDED
                    ),
                    other => bus.describe_api(other),
                })?;
            Ok("created")
        }
        Plan::CreateRestore {
            manifest,
            vm,
            in_place,
        } => {
            let mut options = restore_options(manifest, *in_place)?;
            if *in_place && manifest.readiness == ReadinessPolicy::StopTarget {
                options.insert("stop_target", OwnedVariant::from(true));
            }
            manager
                .restore(vm, &manifest.snapshot, options)
                .await
                .map_err(|e| bus.describe_api(e))?;
            Ok("created")
        }
    }
}

fn manifest_name(m: &Manifest) -> String {
    m.kind().qualified_name(&super::cell(m.name()))
}

/// Reads and checks every manifest of the files given.
pub fn load(args: &ApplyArgs) -> Result<Vec<Manifest>, String> {
    let mut manifests = Vec::new();
    for file in &args.files {
        let text = read_source(file)?;
        let source = if file == "-" {
            "<stdin>"
        } else {
            file.as_str()
        };
        manifests.extend(manifest::parse(&text, source)?);
    }
    Ok(manifests)
}

/// Applies checked manifests. Every plan must be sound before anything is done; then, as
/// `oc apply` does, each object is carried out in order and one that vmsnapd refuses does not
/// stop the others: its error is a line on standard error and the exit status is 1.
pub async fn apply(bus: &Bus, manifests: &[Manifest]) -> Result<(), Failure> {
    let plans = plan_all(bus, manifests).await?;
    let mut failed = 0;
    for (m, plan) in manifests.iter().zip(&plans) {
        match carry_out(bus, plan).await {
            Ok(word) => println!("{} {word}", manifest_name(m)),
            Err(e) => {
                eprintln!("vmsnapctl: {}: {e}", manifest_name(m));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        // Each error was printed where it happened.
        return Err(Failure {
            message: String::new(),
            code: 1,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::model::tests::{restore, snapshot};

    fn snap_item(name: &str, vm: &str) -> SnapshotItem {
        let mut s = snapshot();
        s.name = name.into();
        s.vm = vm.into();
        SnapshotItem {
            path: zbus::OwnedObjectPath::try_from("/x").expect("path"),
            snapshot: s,
            messages: Vec::new(),
            domain_xml: None,
        }
    }

    fn manifest(name: &str, vm: &str) -> SnapshotManifest {
        SnapshotManifest {
            name: name.into(),
            vm: vm.into(),
            description: Some("before the upgrade".into()),
            allow_excluded: false,
            failure_deadline: None,
        }
    }

    #[test]
    fn content_plans() {
        let existing = [snap_item("a", "vm1")];
        let name = crate::kube::model::content_name(&existing[0].snapshot.uuid);
        let content = |snapshot: Option<&str>| ContentManifest {
            name: name.clone(),
            snapshot: snapshot.map(str::to_string),
        };
        assert_eq!(
            plan_content(&content(Some("a")), &existing),
            Ok(Plan::Unchanged)
        );
        assert_eq!(plan_content(&content(None), &existing), Ok(Plan::Unchanged));
        assert!(plan_content(&content(Some("b")), &existing)
            .expect_err("immutable")
            .contains("spec is immutable"));
        let missing = ContentManifest {
            name: "vmsnapshot-content-x".into(),
            snapshot: None,
        };
        assert!(plan_content(&missing, &existing)
            .expect_err("refused")
            .contains("cannot be created"));
    }

    #[test]
    fn snapshot_plans() {
        let existing = [snap_item("a", "vm1")];
        assert_eq!(
            plan_snapshot(&manifest("a", "vm1"), &existing),
            Ok(Plan::Unchanged)
        );
        assert!(matches!(
            plan_snapshot(&manifest("b", "vm1"), &existing),
            Ok(Plan::CreateSnapshot(_))
        ));
        let moved = plan_snapshot(&manifest("a", "vm2"), &existing).expect_err("immutable");
        assert!(
            moved.contains("spec.source.name: spec is immutable"),
            "{moved}"
        );
        let mut other = manifest("a", "vm1");
        other.description = Some("else".into());
        assert!(plan_snapshot(&other, &existing)
            .expect_err("refused")
            .contains("description"));
    }

    fn restore_manifest(name: &str, snapshot: &str, target: &str) -> RestoreManifest {
        RestoreManifest {
            name: name.into(),
            snapshot: snapshot.into(),
            target: target.into(),
            readiness: ReadinessPolicy::StopTarget,
        }
    }

    #[test]
    fn restore_plans() {
        let snapshots = [
            snap_item("s", "vm1"),
            snap_item("t", "vm1"),
            snap_item("t", "vm2"),
        ];
        let restores = [RestoreItem {
            path: zbus::OwnedObjectPath::try_from("/x").expect("path"),
            restore: restore(),
            name: "done".into(),
        }];
        let exists = |name: &str| name == "vm1" || name == "vm2";
        // In place.
        assert!(matches!(
            plan_restore(
                &restore_manifest("r", "s", "vm1"),
                &restores,
                &snapshots,
                exists
            ),
            Ok(Plan::CreateRestore { in_place: true, .. })
        ));
        // A new VM.
        assert!(matches!(
            plan_restore(
                &restore_manifest("r", "s", "vm9"),
                &restores,
                &snapshots,
                exists
            ),
            Ok(Plan::CreateRestore {
                in_place: false,
                ..
            })
        ));
        // Another existing VM.
        let e = plan_restore(
            &restore_manifest("r", "s", "vm2"),
            &restores,
            &snapshots,
            exists,
        )
        .expect_err("refused");
        assert!(
            e.contains("spec.target.name \"vm2\" is another existing VM"),
            "{e}"
        );
        // Ambiguous for a new VM; in place it is the target's own.
        let e = plan_restore(
            &restore_manifest("r", "t", "vm9"),
            &restores,
            &snapshots,
            exists,
        )
        .expect_err("ambiguous");
        assert!(e.contains("ambiguous: VMs vm1, vm2"), "{e}");
        assert!(matches!(
            plan_restore(&restore_manifest("r", "t", "vm2"), &restores, &snapshots, exists),
            Ok(Plan::CreateRestore { in_place: true, ref vm, .. }) if vm == "vm2"
        ));
        // Missing snapshot.
        let e = plan_restore(
            &restore_manifest("r", "x", "vm1"),
            &restores,
            &snapshots,
            exists,
        )
        .expect_err("missing");
        assert!(e.contains("\"x\" not found"), "{e}");
        // The same restore again; and changed.
        assert_eq!(
            plan_restore(
                &restore_manifest("done", "my-vmsnapshot", "my-vm"),
                &restores,
                &snapshots,
                exists
            ),
            Ok(Plan::Unchanged)
        );
        let e = plan_restore(
            &restore_manifest("done", "s", "vm1"),
            &restores,
            &snapshots,
            exists,
        )
        .expect_err("immutable");
        assert!(e.contains("spec is immutable"), "{e}");
    }
}
