//! A VM whose QEMU stops answering (SIGSTOP, as a hung QEMU would) during a snapshot. At
//! failure_deadline the snapshot is Failed (DeadlineExceeded), whatever call is blocked; the VM
//! is busy meanwhile and says why; when QEMU answers again, what the snapshot did is undone and
//! the VM takes new work.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use vmsnap_tests::{
    config_for, virsh, wait_for, Daemon, PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

/// Stops a process with SIGSTOP; continues it when dropped, so a failing test never leaves a
/// QEMU stopped.
struct Stopped(String);

impl Stopped {
    fn new(pid: &str) -> Stopped {
        let status = Command::new("kill").args(["-STOP", pid]).status().unwrap();
        assert!(status.success());
        Stopped(pid.to_string())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

#[test]
fn a_snapshot_of_a_stopped_qemu_fails_at_its_deadline_and_is_undone_when_qemu_answers() {
    let vm = ScratchVm::define("vmsnap-t12-stuck", ScratchOptions::default(), &[]);
    let bus = PrivateBus::start();
    let config = format!("failure_deadline = \"12s\"\n{}", config_for(LAB_URI));
    let daemon = Daemon::start(&bus, &config);
    vm.start(false);
    wait_for(
        Duration::from_secs(60),
        "the VM running in the inventory",
        || {
            let shown = daemon.ctl(&["vm", "show", &vm.name, "--output", "json"]);
            (shown.code == Some(0) && shown.json()["state"] == "running").then_some(())
        },
    );
    let images_before = vm.images();
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", vm.name)).unwrap();
    let stopped = Stopped::new(pid.trim());

    // The snapshot ends while QEMU is still stopped: the deadline held.
    let out = daemon.ctl(&["snapshot", "create", &vm.name, "stuck", "--output", "json"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let failed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(failed["phase"], "Failed", "{failed}");
    assert_eq!(
        failed["errorName"], "org.vmsnap.VmSnap1.Error.DeadlineExceeded",
        "{failed}"
    );
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("did not finish within failure_deadline"),
        "{error}"
    );
    let short = failed["uuid"].as_str().unwrap()[..8].to_string();

    // Meanwhile the VM takes no new work, and says why.
    let refused = daemon.ctl(&["snapshot", "create", &vm.name, "meanwhile"]);
    let message = refused.failure();
    assert!(
        message.contains("still blocked in libvirt or QEMU"),
        "{message}"
    );

    // QEMU answers again: the blocked call returns, what the snapshot did is undone, and the
    // VM takes new work.
    drop(stopped);
    let after = wait_for(Duration::from_secs(180), "the VM to take new work", || {
        let out = daemon.ctl(&["snapshot", "create", &vm.name, "after", "--output", "json"]);
        (out.code == Some(0)).then(|| out.json())
    });
    assert_eq!(after["phase"], "Succeeded", "{after}");
    let stuck = vmsnap_tests::show_snapshot(&daemon, &vm.name, "stuck");
    assert_eq!(stuck["phase"], "Failed", "{stuck}");
    assert!(stuck["snapshotVolumes"]["includedVolumes"]
        .as_array()
        .is_none_or(|v| v.is_empty() || stuck["readyToUse"] == false));
    let leftovers: Vec<String> = vm
        .images()
        .into_iter()
        .filter(|f| f.contains(&short))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the given-up snapshot left {leftovers:?}"
    );
    let after_short = &after["uuid"].as_str().unwrap()[..8];
    let mut expected = images_before.clone();
    expected.extend(vm.images().into_iter().filter(|f| f.contains(after_short)));
    expected.sort();
    assert_eq!(
        vm.images(),
        expected,
        "only the new snapshot's overlay was added"
    );
    virsh(&["destroy", &vm.name]);
}
