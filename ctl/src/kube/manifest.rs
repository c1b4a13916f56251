//! Manifests: YAML or JSON documents of VirtualMachineSnapshot and VirtualMachineRestore
//! (`snapshot.kubevirt.io/v1alpha1` or `v1beta1`), several per file and `kind: List`, read and
//! checked completely before anything is done. Every field vmsnap does not know or cannot do is
//! refused with one line naming it, never silently ignored. `status` and the fields the server
//! sets (`metadata.uid`, `creationTimestamp`, `resourceVersion`, `generation`) are ignored, so
//! that `get -o yaml` output can be applied again.

use std::time::Duration;

use serde_json::{Map, Value};

use super::model::{
    Kind, ANNOTATION_ALLOW_EXCLUDED, ANNOTATION_DESCRIPTION, ANNOTATION_SAFETY_SNAPSHOT,
    ANNOTATION_SOURCE_VM, API_VERSIONS, VM_API_GROUP, VM_KIND,
};
use super::time::parse_go_duration;

/// What to do when the target of an in-place restore is not shut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadinessPolicy {
    /// Shut the VM down first.
    StopTarget,
    /// Fail at once.
    FailImmediate,
    /// Wait up to the grace period for it to be shut off, then fail (KubeVirt's default).
    WaitGracePeriod,
    /// Wait until it is shut off, however long.
    WaitEventually,
}

impl ReadinessPolicy {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReadinessPolicy::StopTarget => "StopTarget",
            ReadinessPolicy::FailImmediate => "FailImmediate",
            ReadinessPolicy::WaitGracePeriod => "WaitGracePeriod",
            ReadinessPolicy::WaitEventually => "WaitEventually",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotManifest {
    pub name: String,
    pub vm: String,
    pub description: Option<String>,
    pub allow_excluded: bool,
    pub failure_deadline: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RestoreManifest {
    pub name: String,
    pub snapshot: String,
    pub target: String,
    pub readiness: ReadinessPolicy,
}

/// A VirtualMachineSnapshotContent: vmsnapd records one with each snapshot, so applying one
/// can only find it unchanged (the round trip of `get vmsnapshotcontent -o yaml`).
#[derive(Debug, Clone, PartialEq)]
pub struct ContentManifest {
    pub name: String,
    /// spec.virtualMachineSnapshotName, when given.
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    Snapshot(SnapshotManifest),
    Restore(RestoreManifest),
    Content(ContentManifest),
}

impl Manifest {
    pub fn kind(&self) -> Kind {
        match self {
            Manifest::Snapshot(_) => Kind::Snapshot,
            Manifest::Restore(_) => Kind::Restore,
            Manifest::Content(_) => Kind::Content,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Manifest::Snapshot(s) => &s.name,
            Manifest::Restore(r) => &r.name,
            Manifest::Content(c) => &c.name,
        }
    }
}

/// A kind and name only, for `delete -f`: the documents need only apiVersion, kind and
/// metadata.name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub kind: Kind,
    pub name: String,
}

/// The documents of a file: YAML (several separated by `---`) or JSON, `kind: List` expanded.
/// Empty documents are skipped.
pub fn documents(text: &str, source: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("{source}: not valid JSON: {e}"))?;
        push_expanded(value, source, &mut out)?;
        return Ok(out);
    }
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(document)
            .map_err(|e| format!("{source}: document {}: not valid YAML: {e}", index + 1))?;
        push_expanded(value, source, &mut out)?;
    }
    Ok(out)
}

fn push_expanded(value: Value, source: &str, out: &mut Vec<Value>) -> Result<(), String> {
    match value {
        Value::Null => Ok(()),
        Value::Array(items) => {
            for item in items {
                push_expanded(item, source, out)?;
            }
            Ok(())
        }
        Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
            for (key, _) in map.iter() {
                if !matches!(key.as_str(), "apiVersion" | "kind" | "items" | "metadata") {
                    return Err(format!("{source}: List: unknown field {key:?}"));
                }
            }
            match map.get("items") {
                Some(Value::Array(items)) => {
                    for item in items {
                        push_expanded(item.clone(), source, out)?;
                    }
                    Ok(())
                }
                None | Some(Value::Null) => Ok(()),
                Some(_) => Err(format!("{source}: List: items must be a list")),
            }
        }
        other => {
            out.push(other);
            Ok(())
        }
    }
}

/// Reads every document of a file into manifests; the first problem is the error.
pub fn parse(text: &str, source: &str) -> Result<Vec<Manifest>, String> {
    let documents = documents(text, source)?;
    if documents.is_empty() {
        return Err(format!("{source}: no objects passed to apply"));
    }
    documents
        .iter()
        .enumerate()
        .map(|(i, doc)| manifest(doc).map_err(|e| format!("{source}: {}: {e}", describe(doc, i))))
        .collect()
}

/// Reads every document of a file as a kind and a name, for `delete -f`.
pub fn references(text: &str, source: &str) -> Result<Vec<Reference>, String> {
    let documents = documents(text, source)?;
    if documents.is_empty() {
        return Err(format!("{source}: no objects passed to delete"));
    }
    documents
        .iter()
        .enumerate()
        .map(|(i, doc)| reference(doc).map_err(|e| format!("{source}: {}: {e}", describe(doc, i))))
        .collect()
}

/// "document 2 (VirtualMachineSnapshot my-snap)" for messages.
fn describe(doc: &Value, index: usize) -> String {
    let kind = doc.get("kind").and_then(Value::as_str);
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    match (kind, name) {
        (Some(kind), Some(name)) => format!("document {} ({kind} {name})", index + 1),
        (Some(kind), None) => format!("document {} ({kind})", index + 1),
        _ => format!("document {}", index + 1),
    }
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{path} must be an object"))
}

fn string<'a>(value: &'a Value, path: &str) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("{path} must be a string"))
}

fn required<'a>(map: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a Value, String> {
    match map.get(key) {
        None | Some(Value::Null) => Err(format!("{path}.{key} is required")),
        Some(value) => Ok(value),
    }
}

fn only_known(map: &Map<String, Value>, path: &str, known: &[&str]) -> Result<(), String> {
    for key in map.keys() {
        if !known.contains(&key.as_str()) {
            let at = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            return Err(format!("unknown field {at:?}"));
        }
    }
    Ok(())
}

fn kind_and_version(doc: &Map<String, Value>) -> Result<Kind, String> {
    let api_version = string(required(doc, "apiVersion", "")?, "apiVersion")?;
    let kind = string(required(doc, "kind", "")?, "kind")?;
    if !API_VERSIONS.contains(&api_version) {
        return Err(format!(
            "apiVersion {api_version:?} is not supported (use {})",
            API_VERSIONS.join(" or ")
        ));
    }
    match Kind::from_kind(kind) {
        Some(kind) => Ok(kind),
        None => Err(format!(
            "kind {kind:?} is not supported (use VirtualMachineSnapshot or VirtualMachineRestore)"
        )),
    }
}

fn reference(doc: &Value) -> Result<Reference, String> {
    let doc = object(doc, "the document")?;
    let kind = kind_and_version(doc)?;
    let metadata = object(required(doc, "metadata", "")?, "metadata")?;
    let name = string(required(metadata, "name", "metadata")?, "metadata.name")?;
    Ok(Reference {
        kind,
        name: name.to_string(),
    })
}

/// metadata: name, and annotations (only those in `annotations`); namespace and the fields the
/// server sets are accepted and ignored.
fn metadata(
    doc: &Map<String, Value>,
    kind: Kind,
    annotations: &[&str],
) -> Result<(String, Map<String, Value>), String> {
    let metadata = object(required(doc, "metadata", "")?, "metadata")?;
    only_known(
        metadata,
        "metadata",
        &[
            "name",
            "namespace",
            "annotations",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "generation",
        ],
    )?;
    let name = string(required(metadata, "name", "metadata")?, "metadata.name")?;
    let noun = match kind {
        Kind::Restore => "restore",
        _ => "snapshot",
    };
    vmsnap_api::validate_snapshot_name(name)
        .map_err(|e| format!("metadata.name: {}", e.replacen("snapshot", noun, 1)))?;
    if let Some(namespace) = metadata.get("namespace") {
        string(namespace, "metadata.namespace")?;
    }
    let mut found = Map::new();
    match metadata.get("annotations") {
        None | Some(Value::Null) => {}
        Some(value) => {
            for (key, value) in object(value, "metadata.annotations")? {
                let path = format!("metadata.annotations.{key:?}");
                if key == "kubectl.kubernetes.io/last-applied-configuration" {
                    continue;
                }
                if !annotations.contains(&key.as_str()) {
                    return Err(format!(
                        "unknown annotation {key:?} (vmsnap stores only {})",
                        annotations.join(", ")
                    ));
                }
                string(value, &path)?;
                found.insert(key.clone(), value.clone());
            }
        }
    }
    Ok((name.to_string(), found))
}

/// A `{apiGroup: kubevirt.io, kind: VirtualMachine, name}` reference; returns the name.
fn vm_reference(value: &Value, path: &str) -> Result<String, String> {
    let map = object(value, path)?;
    only_known(map, path, &["apiGroup", "kind", "name"])?;
    match map.get("apiGroup") {
        Some(Value::String(group)) if group == VM_API_GROUP => {}
        None | Some(Value::Null) => {
            return Err(format!("{path}.apiGroup is required (kubevirt.io)"));
        }
        Some(other) => {
            return Err(format!(
                "{path}.apiGroup {} is not supported: only kubevirt.io VirtualMachines",
                short(other)
            ))
        }
    }
    let kind = string(required(map, "kind", path)?, &format!("{path}.kind"))?;
    if kind != VM_KIND {
        return Err(format!(
            "{path}.kind {kind:?} is not supported: only VirtualMachine"
        ));
    }
    let name = string(required(map, "name", path)?, &format!("{path}.name"))?;
    if name.is_empty() {
        return Err(format!("{path}.name must not be empty"));
    }
    Ok(name.to_string())
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        format!("{}...", text.chars().take(40).collect::<String>())
    } else {
        text
    }
}

fn manifest(doc: &Value) -> Result<Manifest, String> {
    let doc = object(doc, "the document")?;
    let kind = kind_and_version(doc)?;
    only_known(
        doc,
        "",
        &["apiVersion", "kind", "metadata", "spec", "status"],
    )?;
    match kind {
        Kind::Snapshot => snapshot(doc).map(Manifest::Snapshot),
        Kind::Restore => restore(doc).map(Manifest::Restore),
        Kind::Content => content(doc).map(Manifest::Content),
    }
}

fn content(doc: &Map<String, Value>) -> Result<ContentManifest, String> {
    let (name, _) = metadata(doc, Kind::Content, &[])?;
    let spec = object(required(doc, "spec", "")?, "spec")?;
    only_known(
        spec,
        "spec",
        &["source", "virtualMachineSnapshotName", "volumeBackups"],
    )?;
    let snapshot = match spec.get("virtualMachineSnapshotName") {
        None | Some(Value::Null) => None,
        Some(value) => Some(string(value, "spec.virtualMachineSnapshotName")?.to_string()),
    };
    Ok(ContentManifest { name, snapshot })
}

fn snapshot(doc: &Map<String, Value>) -> Result<SnapshotManifest, String> {
    let (name, annotations) = metadata(
        doc,
        Kind::Snapshot,
        &[ANNOTATION_DESCRIPTION, ANNOTATION_ALLOW_EXCLUDED],
    )?;
    let spec = object(required(doc, "spec", "")?, "spec")?;
    only_known(
        spec,
        "spec",
        &["source", "deletionPolicy", "failureDeadline"],
    )?;
    let vm = vm_reference(required(spec, "source", "spec")?, "spec.source")?;
    match spec.get("deletionPolicy") {
        None | Some(Value::Null) => {}
        Some(Value::String(p)) if p == "Delete" => {}
        Some(Value::String(p)) if p == "Retain" => {
            return Err(
                "spec.deletionPolicy Retain is not supported: a snapshot's data goes with it \
                 (use Delete or leave it out)"
                    .to_string(),
            )
        }
        Some(other) => {
            return Err(format!(
                "spec.deletionPolicy {} is not supported (use Delete)",
                short(other)
            ))
        }
    }
    let failure_deadline = match spec.get("failureDeadline") {
        None | Some(Value::Null) => None,
        Some(value) => {
            let text = string(value, "spec.failureDeadline")?;
            let duration =
                parse_go_duration(text).map_err(|e| format!("spec.failureDeadline: {e}"))?;
            if duration.is_zero() {
                return Err("spec.failureDeadline must be longer than 0s".to_string());
            }
            Some(duration)
        }
    };
    let allow_excluded = match annotations
        .get(ANNOTATION_ALLOW_EXCLUDED)
        .and_then(Value::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(format!(
                "metadata.annotations.{ANNOTATION_ALLOW_EXCLUDED:?} must be \"true\" or \
                 \"false\", not {other:?}"
            ))
        }
    };
    Ok(SnapshotManifest {
        name,
        vm,
        description: annotations
            .get(ANNOTATION_DESCRIPTION)
            .and_then(Value::as_str)
            .map(str::to_string),
        allow_excluded,
        failure_deadline,
    })
}

fn restore(doc: &Map<String, Value>) -> Result<RestoreManifest, String> {
    let (name, _) = metadata(
        doc,
        Kind::Restore,
        &[ANNOTATION_SOURCE_VM, ANNOTATION_SAFETY_SNAPSHOT],
    )?;
    let spec = object(required(doc, "spec", "")?, "spec")?;
    if let Some(patches) = spec.get("patches") {
        if !patches.is_null() && patches.as_array().is_none_or(|p| !p.is_empty()) {
            return Err(
                "spec.patches is not supported: vmsnap restores the recorded definition as it is"
                    .to_string(),
            );
        }
    }
    if let Some(overrides) = spec.get("volumeRestoreOverrides") {
        if !overrides.is_null() && overrides.as_array().is_none_or(|p| !p.is_empty()) {
            return Err(
                "spec.volumeRestoreOverrides is not supported: vmsnap names the restored images"
                    .to_string(),
            );
        }
    }
    match spec.get("volumeRestorePolicy") {
        None | Some(Value::Null) => {}
        Some(Value::String(p)) if p == "RandomizeNames" => {}
        Some(other) => {
            return Err(format!(
                "spec.volumeRestorePolicy {} is not supported: vmsnap always restores onto new \
                 images (RandomizeNames)",
                short(other)
            ))
        }
    }
    if let Some(policy) = spec.get("volumeOwnershipPolicy") {
        if !policy.is_null() {
            return Err(format!(
                "spec.volumeOwnershipPolicy {} is not supported: a VM's images belong to it",
                short(policy)
            ));
        }
    }
    only_known(
        spec,
        "spec",
        &[
            "target",
            "virtualMachineSnapshotName",
            "targetReadinessPolicy",
            "patches",
            "volumeRestoreOverrides",
            "volumeRestorePolicy",
            "volumeOwnershipPolicy",
        ],
    )?;
    let target = vm_reference(required(spec, "target", "spec")?, "spec.target")?;
    let snapshot = string(
        required(spec, "virtualMachineSnapshotName", "spec")?,
        "spec.virtualMachineSnapshotName",
    )?;
    if snapshot.is_empty() {
        return Err("spec.virtualMachineSnapshotName must not be empty".to_string());
    }
    let readiness = match spec.get("targetReadinessPolicy") {
        None | Some(Value::Null) => ReadinessPolicy::WaitGracePeriod,
        Some(value) => match string(value, "spec.targetReadinessPolicy")? {
            "StopTarget" => ReadinessPolicy::StopTarget,
            "FailImmediate" => ReadinessPolicy::FailImmediate,
            "WaitGracePeriod" => ReadinessPolicy::WaitGracePeriod,
            "WaitEventually" => ReadinessPolicy::WaitEventually,
            other => {
                return Err(format!(
                    "spec.targetReadinessPolicy {other:?} is not one of StopTarget, \
                     FailImmediate, WaitGracePeriod, WaitEventually"
                ))
            }
        },
    };
    Ok(RestoreManifest {
        name,
        snapshot: snapshot.to_string(),
        target,
        readiness,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_SNAPSHOT: &str = "\
apiVersion: snapshot.kubevirt.io/v1alpha1
kind: VirtualMachineSnapshot
metadata:
  name: my-vmsnapshot
spec:
  source:
    apiGroup: kubevirt.io
    kind: VirtualMachine
    name: my-vm
";

    /// KubeVirt's documentation's VirtualMachineRestore example.
    const DOC_RESTORE: &str = "\
apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineRestore
metadata:
  name: my-vmrestore
spec:
  target:
    apiGroup: kubevirt.io
    kind: VirtualMachine
    name: my-vm
  virtualMachineSnapshotName: my-vmsnapshot
";

    fn one(text: &str) -> Result<Manifest, String> {
        let mut all = parse(text, "-")?;
        assert_eq!(all.len(), 1);
        Ok(all.remove(0))
    }

    #[test]
    fn the_issues_snapshot_manifest() {
        assert_eq!(
            one(ISSUE_SNAPSHOT),
            Ok(Manifest::Snapshot(SnapshotManifest {
                name: "my-vmsnapshot".into(),
                vm: "my-vm".into(),
                description: None,
                allow_excluded: false,
                failure_deadline: None,
            }))
        );
    }

    #[test]
    fn kubevirts_restore_example() {
        assert_eq!(
            one(DOC_RESTORE),
            Ok(Manifest::Restore(RestoreManifest {
                name: "my-vmrestore".into(),
                snapshot: "my-vmsnapshot".into(),
                target: "my-vm".into(),
                readiness: ReadinessPolicy::WaitGracePeriod,
            }))
        );
        let with_policy = format!("{DOC_RESTORE}  targetReadinessPolicy: StopTarget\n");
        let Ok(Manifest::Restore(r)) = one(&with_policy) else {
            panic!("not a restore");
        };
        assert_eq!(r.readiness, ReadinessPolicy::StopTarget);
    }

    #[test]
    fn annotations_deadline_and_namespace() {
        let text = "\
apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineSnapshot
metadata:
  name: nightly
  namespace: default
  annotations:
    snapshot.vmsnap.org/description: before the upgrade
    snapshot.vmsnap.org/allow-excluded: \"true\"
spec:
  deletionPolicy: Delete
  failureDeadline: 1m30s
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: db}
";
        assert_eq!(
            one(text),
            Ok(Manifest::Snapshot(SnapshotManifest {
                name: "nightly".into(),
                vm: "db".into(),
                description: Some("before the upgrade".into()),
                allow_excluded: true,
                failure_deadline: Some(Duration::from_secs(90)),
            }))
        );
    }

    #[test]
    fn several_documents_lists_and_json() {
        let text = format!("{ISSUE_SNAPSHOT}---\n{DOC_RESTORE}---\n");
        let all = parse(&text, "f.yaml").expect("parses");
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].kind(), Kind::Restore);

        let list = "\
apiVersion: v1
kind: List
items:
- apiVersion: snapshot.kubevirt.io/v1beta1
  kind: VirtualMachineSnapshot
  metadata: {name: a}
  spec: {source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm1}}
- apiVersion: snapshot.kubevirt.io/v1beta1
  kind: VirtualMachineSnapshot
  metadata: {name: b}
  spec: {source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm1}}
";
        let all = parse(list, "-").expect("parses");
        assert_eq!(
            all.iter().map(Manifest::name).collect::<Vec<_>>(),
            ["a", "b"]
        );

        let json = r#"{"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
            "metadata": {"name": "j"}, "spec": {"source": {"apiGroup": "kubevirt.io",
            "kind": "VirtualMachine", "name": "vm1"}}}"#;
        assert_eq!(one(json).map(|m| m.name().to_string()), Ok("j".to_string()));
    }

    #[test]
    fn round_trip_of_get_output() {
        let object =
            crate::kube::model::snapshot_object(&crate::kube::model::tests::snapshot(), &[]);
        let yaml = crate::emit::to_yaml(&object).expect("yaml");
        let Ok(Manifest::Snapshot(s)) = one(&yaml) else {
            panic!("not parsed: {yaml}");
        };
        assert_eq!(s.name, "my-vmsnapshot");
        assert_eq!(s.vm, "my-vm");
        assert_eq!(s.description.as_deref(), Some("before the upgrade"));
        assert!(s.allow_excluded);

        let object =
            crate::kube::model::restore_object(&crate::kube::model::tests::restore(), "r1");
        let yaml = crate::emit::to_yaml(&crate::kube::model::list(vec![object])).expect("yaml");
        let Ok(Manifest::Restore(r)) = one(&yaml) else {
            panic!("not parsed: {yaml}");
        };
        assert_eq!(
            (r.name.as_str(), r.snapshot.as_str()),
            ("r1", "my-vmsnapshot")
        );
    }

    /// Every refused field, with the words of its error.
    #[test]
    fn refusals_name_the_field() {
        let snap = |spec: &str| {
            format!(
                "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\n\
                 metadata:\n  name: s\nspec:\n{spec}"
            )
        };
        let source = "  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm}\n";
        let restore = |spec: &str| {
            format!(
                "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineRestore\n\
                 metadata:\n  name: r\nspec:\n  target: {{apiGroup: kubevirt.io, kind: \
                 VirtualMachine, name: vm}}\n  virtualMachineSnapshotName: s\n{spec}"
            )
        };
        let cases: Vec<(String, &str)> = vec![
            (
                snap(&format!("{source}  deletionPolicy: Retain\n")),
                "spec.deletionPolicy Retain",
            ),
            (
                snap(&format!("{source}  deletionPolicy: Keep\n")),
                "spec.deletionPolicy",
            ),
            (
                snap(&format!("{source}  failureDeadline: soon\n")),
                "spec.failureDeadline",
            ),
            (
                snap(&format!("{source}  failureDeadline: 0s\n")),
                "spec.failureDeadline",
            ),
            (
                snap(&format!("{source}  color: blue\n")),
                "unknown field \"spec.color\"",
            ),
            (
                snap("  source: {apiGroup: cdi.kubevirt.io, kind: VirtualMachine, name: vm}\n"),
                "spec.source.apiGroup",
            ),
            (
                snap("  source: {kind: VirtualMachine, name: vm}\n"),
                "spec.source.apiGroup",
            ),
            (
                snap("  source: {apiGroup: kubevirt.io, kind: VirtualMachineInstance, name: vm}\n"),
                "spec.source.kind",
            ),
            (
                snap("  source: {apiGroup: kubevirt.io, kind: VirtualMachine}\n"),
                "spec.source.name",
            ),
            (
                snap("  deletionPolicy: Delete\n"),
                "spec.source is required",
            ),
            (
                restore("  patches: ['{\"op\": \"replace\"}']\n"),
                "spec.patches",
            ),
            (
                restore("  volumeRestorePolicy: InPlace\n"),
                "spec.volumeRestorePolicy",
            ),
            (
                restore("  volumeRestorePolicy: PrefixTargetName\n"),
                "spec.volumeRestorePolicy",
            ),
            (
                restore("  volumeOwnershipPolicy: Vm\n"),
                "spec.volumeOwnershipPolicy",
            ),
            (
                restore("  volumeRestoreOverrides: [{volumeName: vda}]\n"),
                "spec.volumeRestoreOverrides",
            ),
            (
                restore("  targetReadinessPolicy: Later\n"),
                "spec.targetReadinessPolicy",
            ),
            (restore("  extra: 1\n"), "unknown field \"spec.extra\""),
        ];
        for (text, words) in cases {
            let error = parse(&text, "-").expect_err(&text);
            assert!(error.contains(words), "{error:?} lacks {words:?}\n{text}");
            assert!(!error.contains('\n'), "{error:?}");
        }

        let top: Vec<(&str, &str)> = vec![
            ("apiVersion: v1\nkind: VirtualMachineSnapshot\nmetadata: {name: s}\nspec: {}\n", "apiVersion \"v1\""),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: Pod\nmetadata: {name: s}\n", "kind \"Pod\""),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshotContent\nmetadata: {name: s}\n", "spec is required"),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshotContent\nmetadata: {name: s}\nspec: {volumeSnapshotClass: x}\n", "unknown field \"spec.volumeSnapshotClass\""),
            ("kind: VirtualMachineSnapshot\nmetadata: {name: s}\n", "apiVersion is required"),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata: {name: s, labels: {a: b}}\nspec: {source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm}}\n", "metadata.labels"),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata: {name: s, annotations: {x: y}}\nspec: {source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm}}\n", "unknown annotation \"x\""),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata: {name: s, annotations: {snapshot.vmsnap.org/allow-excluded: yes please}}\nspec: {source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm}}\n", "allow-excluded"),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata: {name: ../x}\nspec: {source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm}}\n", "metadata.name"),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nspec: {source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm}}\n", "metadata is required"),
            ("apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata: {name: s}\nspec: {source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: vm}}\nextra: 1\n", "unknown field \"extra\""),
            ("- 1\n", "must be an object"),
            ("a: [\n", "not valid YAML"),
            ("", "no objects"),
        ];
        for (text, words) in top {
            let error = parse(text, "-").expect_err(text);
            assert!(error.contains(words), "{error:?} lacks {words:?}\n{text}");
        }
        // The first bad document refuses the whole file.
        let text = format!("{ISSUE_SNAPSHOT}---\n{}", restore("  patches: [x]\n"));
        let error = parse(&text, "f.yaml").expect_err("refused");
        assert!(
            error.starts_with("f.yaml: document 2 (VirtualMachineRestore r): spec.patches"),
            "{error}"
        );
    }

    #[test]
    fn references_for_delete() {
        let text = format!("{ISSUE_SNAPSHOT}---\n{DOC_RESTORE}");
        assert_eq!(
            references(&text, "-"),
            Ok(vec![
                Reference {
                    kind: Kind::Snapshot,
                    name: "my-vmsnapshot".into()
                },
                Reference {
                    kind: Kind::Restore,
                    name: "my-vmrestore".into()
                },
            ])
        );
    }
}
