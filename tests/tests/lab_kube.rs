//! KubeVirt's objects end to end against real guests, through manifests only: the issue's
//! VirtualMachineSnapshot manifest and KubeVirt's documented VirtualMachineRestore, applied as
//! they are; data destroyed in the guest comes back (checksums); targetReadinessPolicy
//! WaitGracePeriod waits, proceeds once the VM is shut off by hand, and fails after the grace
//! period having changed nothing.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmsnap_tests::{
    config_for, snapshot_manifest, virsh, wait_for, CtlOutput, Daemon, GuestSlot, PrivateBus,
    ScratchVm, LAB_URI,
};

fn apply(daemon: &Daemon, manifest: &str) -> CtlOutput {
    vmsnap_tests::ctl_with_input(&daemon.bus_address, &["apply", "-f", "-"], manifest)
}

/// KubeVirt's documented VirtualMachineRestore, with an optional targetReadinessPolicy.
fn restore_manifest(name: &str, vm: &str, snapshot: &str, policy: Option<&str>) -> String {
    let mut text = format!(
        "apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineRestore
metadata:
  name: {name}
spec:
  target:
    apiGroup: kubevirt.io
    kind: VirtualMachine
    name: {vm}
  virtualMachineSnapshotName: {snapshot}
"
    );
    if let Some(policy) = policy {
        text.push_str(&format!("  targetReadinessPolicy: {policy}\n"));
    }
    text
}

/// A VM a restore created: undefined on drop (its disks live in the source VM's directory).
struct NewVm(String);

impl Drop for NewVm {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", LAB_URI, "undefine", &self.0])
            .output();
    }
}

fn daemon_for(vm: &ScratchVm, extra_config: &str) -> (PrivateBus, Daemon) {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &format!("{}{extra_config}", config_for(LAB_URI)));
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        let out = daemon.ctl(&["vm", "show", &vm.name, "--output", "json"]);
        (out.code == Some(0)).then_some(())
    });
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    (bus, daemon)
}

fn get(daemon: &Daemon, resource: &str, name: &str) -> Value {
    daemon.ctl(&["get", resource, name, "-o", "json"]).json()
}

fn snapshot_ready(daemon: &Daemon, name: &str) {
    let waited = daemon.ctl(&[
        "wait",
        "--for=condition=Ready",
        &format!("vmsnapshot/{name}"),
        "--timeout=3m",
    ]);
    assert_eq!(
        waited.ok(),
        format!("virtualmachinesnapshot.snapshot.kubevirt.io/{name} condition met\n")
    );
}

#[test]
fn seed_flow_through_manifests_only() {
    let _slot = GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t15-seed");
    let (_bus, daemon) = daemon_for(&vm, "");
    vm.write_file("f1", 300_000);
    vm.write_file("f2", 4096);
    let good = vm.guest_checksums();
    assert_eq!(good.lines().count(), 2, "{good}");

    let manifest = snapshot_manifest("my-vmsnapshot", &vm.name);
    assert_eq!(
        apply(&daemon, &manifest).ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/my-vmsnapshot created\n"
    );
    snapshot_ready(&daemon, "my-vmsnapshot");
    let snapshot = get(&daemon, "vmsnapshot", "my-vmsnapshot");
    let status = &snapshot["status"];
    assert_eq!(status["phase"], "Succeeded", "{snapshot}");
    assert_eq!(status["readyToUse"], true);
    assert_eq!(status["sourceUID"], vm.uuid());
    assert_eq!(
        status["indications"],
        serde_json::json!(["Online", "GuestAgent"])
    );
    assert!(status["sourceIndications"][1]["message"]
        .as_str()
        .unwrap()
        .contains("froze"));
    assert_eq!(
        status["snapshotVolumes"],
        serde_json::json!({"includedVolumes": ["vda"], "excludedVolumes": []})
    );
    // The content record: the recorded definition and the volume backup of vda.
    let content_name = status["virtualMachineSnapshotContentName"]
        .as_str()
        .unwrap();
    let content = get(&daemon, "vmsnapshotcontent", content_name);
    let xml = content["spec"]["source"]["virtualMachine"]["domainXML"]
        .as_str()
        .unwrap();
    assert!(xml.contains(&format!("<name>{}</name>", vm.name)), "{xml}");
    let backups = content["spec"]["volumeBackups"].as_array().unwrap();
    assert_eq!(backups.len(), 1);
    assert_eq!(backups[0]["volumeName"], "vda");
    assert!(std::path::Path::new(backups[0]["image"].as_str().unwrap()).exists());

    // get -o yaml into apply: unchanged.
    let yaml = daemon
        .ctl(&["get", "vmsnapshot", "my-vmsnapshot", "-o", "yaml"])
        .ok()
        .to_string();
    assert_eq!(
        apply(&daemon, &yaml).ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/my-vmsnapshot unchanged\n"
    );

    // The accident.
    vm.exec("rm -f /mnt/data/f1 /mnt/data/f2 && sync");
    assert_eq!(vm.guest_checksums(), "");

    // KubeVirt's restore example, StopTarget, on the running VM.
    let restore = restore_manifest(
        "my-vmrestore",
        &vm.name,
        "my-vmsnapshot",
        Some("StopTarget"),
    );
    assert_eq!(
        apply(&daemon, &restore).ok(),
        "virtualmachinerestore.snapshot.kubevirt.io/my-vmrestore created\n"
    );
    assert_eq!(
        daemon
            .ctl(&[
                "wait",
                "--for=condition=Ready",
                "vmrestore/my-vmrestore",
                "--timeout=5m"
            ])
            .ok(),
        "virtualmachinerestore.snapshot.kubevirt.io/my-vmrestore condition met\n"
    );
    let object = get(&daemon, "vmrestore", "my-vmrestore");
    assert_eq!(object["status"]["complete"], true, "{object}");
    assert_eq!(object["status"]["restores"][0]["volumeName"], "vda");
    assert_eq!(object["spec"]["target"]["name"], vm.name.as_str());
    assert_eq!(
        apply(&daemon, &restore).ok(),
        "virtualmachinerestore.snapshot.kubevirt.io/my-vmrestore unchanged\n"
    );
    let table = daemon.ctl(&["get", "vmrestore"]).ok().to_string();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row[..4],
        ["my-vmrestore", "VirtualMachine", vm.name.as_str(), "true"]
    );
    vmsnap_tests::check_introspection(
        &daemon.bus_address,
        &vmsnap_api::restore_path(object["metadata"]["uid"].as_str().unwrap()),
        vmsnap_api::RESTORE_INTERFACE,
    );

    // Start it: the data is back.
    assert_eq!(virsh(&["domstate", &vm.name]).trim(), "shut off");
    vm.start(true);
    assert_eq!(vm.guest_checksums(), good);

    // A target that does not exist: the snapshot becomes a new VM (KubeVirt's restore to a new
    // VM), with the data of then; the source VM is left alone.
    let copy = format!("{}-copy", vm.name);
    let to_new = restore_manifest("to-new-vm", &copy, "my-vmsnapshot", None);
    assert_eq!(
        apply(&daemon, &to_new).ok(),
        "virtualmachinerestore.snapshot.kubevirt.io/to-new-vm created\n"
    );
    let waited = daemon.ctl(&[
        "wait",
        "--for=condition=Ready",
        "vmrestore/to-new-vm",
        "--timeout=5m",
    ]);
    let copy_guard = NewVm(copy.clone());
    waited.ok();
    let object = get(&daemon, "vmrestore", "to-new-vm");
    assert_eq!(object["spec"]["target"]["name"], copy.as_str());
    assert_eq!(virsh(&["domstate", &copy]).trim(), "shut off");
    assert_eq!(virsh(&["domstate", &vm.name]).trim(), "running");
    // Another existing VM as the target: refused, nothing created.
    let refused = apply(
        &daemon,
        &restore_manifest("onto-other", &copy, "my-vmsnapshot", None),
    );
    assert!(
        refused.failure().contains("is another existing VM"),
        "{refused:?}"
    );
    assert!(daemon
        .ctl(&["get", "vmrestore", "onto-other"])
        .failure()
        .contains("not found"));
    drop(copy_guard);

    // Restores can be deleted; the VM stays as it is.
    assert_eq!(
        daemon.ctl(&["delete", "vmrestore", "my-vmrestore"]).ok(),
        "virtualmachinerestore.snapshot.kubevirt.io \"my-vmrestore\" deleted\n"
    );
    assert!(daemon
        .ctl(&["get", "vmrestore", "my-vmrestore"])
        .failure()
        .contains("not found"));
    assert_eq!(vm.guest_checksums(), good);
}

#[test]
fn wait_grace_period_waits_proceeds_and_times_out() {
    let _slot = GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t15-wait");
    // The documented key, shortened for the test.
    let (_bus, daemon) = daemon_for(&vm, "restore_grace_period = \"15s\"\n");
    vm.write_file("f1", 100_000);
    let good = vm.guest_checksums();
    assert_eq!(
        apply(&daemon, &snapshot_manifest("base", &vm.name)).code,
        Some(0)
    );
    snapshot_ready(&daemon, "base");
    vm.exec("rm -f /mnt/data/f1 && sync");

    // FailImmediate on the running VM: refused, nothing created.
    let refused = apply(
        &daemon,
        &restore_manifest("now", &vm.name, "base", Some("FailImmediate")),
    );
    assert!(refused.failure().contains("is running"), "{refused:?}");
    assert!(daemon
        .ctl(&["get", "vmrestore", "now"])
        .failure()
        .contains("not found"));

    // The default policy, WaitGracePeriod: the restore waits in phase Waiting.
    assert_eq!(
        apply(&daemon, &restore_manifest("later", &vm.name, "base", None)).ok(),
        "virtualmachinerestore.snapshot.kubevirt.io/later created\n"
    );
    let waiting = wait_for(Duration::from_secs(10), "phase Waiting", || {
        let object = get(&daemon, "vmrestore", "later");
        (object["status"]["phase"] == "Waiting").then_some(object)
    });
    assert_eq!(waiting["status"]["complete"], false);
    assert_eq!(virsh(&["domstate", &vm.name]).trim(), "running");
    // Shut off by hand: the restore proceeds.
    vm.exec("sync");
    virsh(&["destroy", &vm.name]);
    assert_eq!(
        daemon
            .ctl(&[
                "wait",
                "--for=condition=Ready",
                "vmrestore/later",
                "--timeout=3m"
            ])
            .ok(),
        "virtualmachinerestore.snapshot.kubevirt.io/later condition met\n"
    );
    vm.start(true);
    assert_eq!(vm.guest_checksums(), good);

    // Nobody shuts it down: the restore fails after the grace period, nothing changed.
    vm.write_file("f9", 5000);
    let before = vm.guest_checksums();
    let snapshots_before = daemon
        .ctl(&["get", "vmsnapshot", "-o", "name"])
        .ok()
        .to_string();
    let started = Instant::now();
    assert_eq!(
        apply(
            &daemon,
            &restore_manifest("never", &vm.name, "base", Some("WaitGracePeriod"))
        )
        .code,
        Some(0)
    );
    assert_eq!(
        daemon
            .ctl(&[
                "wait",
                "--for=condition=Failure",
                "vmrestore/never",
                "--timeout=2m"
            ])
            .ok(),
        "virtualmachinerestore.snapshot.kubevirt.io/never condition met\n"
    );
    let elapsed = started.elapsed();
    let failed = get(&daemon, "vmrestore", "never");
    let message = failed["status"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("grace period"), "{message}");
    assert!(elapsed >= Duration::from_secs(15), "{elapsed:?}: {failed}");
    assert_eq!(virsh(&["domstate", &vm.name]).trim(), "running");
    assert_eq!(vm.guest_checksums(), before);
    assert_eq!(
        daemon.ctl(&["get", "vmsnapshot", "-o", "name"]).ok(),
        snapshots_before,
        "no safety snapshot was taken"
    );

    // Deleting a restore that waits cancels it: nothing changes, and it is gone.
    assert_eq!(
        apply(
            &daemon,
            &restore_manifest("cancel-me", &vm.name, "base", Some("WaitEventually"))
        )
        .code,
        Some(0)
    );
    wait_for(Duration::from_secs(10), "phase Waiting", || {
        let object = get(&daemon, "vmrestore", "cancel-me");
        (object["status"]["phase"] == "Waiting").then_some(())
    });
    assert_eq!(
        daemon.ctl(&["delete", "vmrestore", "cancel-me"]).ok(),
        "virtualmachinerestore.snapshot.kubevirt.io \"cancel-me\" deleted\n"
    );
    assert_eq!(virsh(&["domstate", &vm.name]).trim(), "running");
    assert_eq!(vm.guest_checksums(), before);
    assert_eq!(
        daemon.ctl(&["get", "vmsnapshot", "-o", "name"]).ok(),
        snapshots_before
    );

    // Both restores can be deleted.
    let deleted = daemon.ctl(&["delete", "vmrestore", "later", "never"]);
    assert_eq!(deleted.ok().lines().count(), 2, "{deleted:?}");
    let listed = daemon.ctl(&["get", "vmrestores", "-o", "name"]);
    assert_eq!(listed.ok(), "");
}

#[test]
fn a_vm_with_only_a_cdrom_gets_a_snapshot_of_its_definition_alone() {
    vmsnap_tests::require_lab();
    let name = "vmsnap-t15-nodisk";
    let dir = tempfile::Builder::new()
        .prefix("vmsnap-t15-nodisk-")
        .tempdir_in(vmsnap_tests::lab_dir())
        .unwrap();
    let iso = dir.path().join("cidata.img");
    std::fs::write(&iso, vec![0u8; 1 << 20]).unwrap();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='sda' bus='sata'/><readonly/></disk>\
         <video><model type='none'/></video><memballoon model='none'/></devices></domain>",
        iso.display()
    );
    let xml_path = dir.path().join("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    virsh(&["define", xml_path.to_str().unwrap()]);
    // Undefined on drop, with the directory.
    let vm = ScratchVm {
        name: name.to_string(),
        disk: iso.clone(),
        dir,
    };
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });

    // Without the annotation, the excluded cdrom is refused, naming the annotation.
    let refused = apply(&daemon, &snapshot_manifest("def-only", &vm.name));
    let message = refused.failure();
    assert!(message.contains("sda"), "{message}");
    assert!(
        message.contains("snapshot.vmsnap.org/allow-excluded"),
        "{message}"
    );

    let manifest = snapshot_manifest("def-only", &vm.name).replace(
        "  name: def-only\n",
        "  name: def-only\n  annotations:\n    snapshot.vmsnap.org/allow-excluded: \"true\"\n",
    );
    assert_eq!(apply(&daemon, &manifest).code, Some(0));
    snapshot_ready(&daemon, "def-only");
    let object = get(&daemon, "vmsnapshot", "def-only");
    let status = &object["status"];
    assert_eq!(
        status["snapshotVolumes"],
        serde_json::json!({"includedVolumes": [], "excludedVolumes": ["sda"]})
    );
    assert_eq!(
        status["indications"],
        serde_json::json!(["PartialSnapshot"])
    );
    let message = status["sourceIndications"][0]["message"].as_str().unwrap();
    assert!(message.contains("sda (cdrom"), "{message}");
    let content = get(
        &daemon,
        "vmsnapshotcontent",
        status["virtualMachineSnapshotContentName"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(content["spec"]["volumeBackups"], serde_json::json!([]));
    assert!(content["spec"]["source"]["virtualMachine"]["domainXML"]
        .as_str()
        .unwrap()
        .contains(&format!("<name>{name}</name>")));
    // Re-applied: unchanged; and the round trip of get.
    assert!(apply(&daemon, &manifest).ok().ends_with("unchanged\n"));
    let yaml = daemon
        .ctl(&["get", "vmsnapshot", "def-only", "-o", "yaml"])
        .ok()
        .to_string();
    assert!(apply(&daemon, &yaml).ok().ends_with("unchanged\n"));
}
