//! A VM whose QEMU stops answering (SIGSTOP, as a hung QEMU would) during a snapshot. At
//! failure_deadline the snapshot is Failed (DeadlineExceeded), whatever call is blocked, and the
//! VM is released: its lock (the one the libvirt hook reads) is free and it takes new work (which
//! blocks as well here, and is given up the same way); the given-up snapshot cannot be deleted
//! while its call is pending. When QEMU answers again, each late thread takes the VM back in turn
//! and undoes what its call did: nothing of either snapshot is left, and the VM takes new work.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use vmsnap_tests::{
    config_for, virsh, wait_for, Daemon, PrivateBus, ScratchOptions, ScratchVm, Stopped, LAB_URI,
};

#[test]
fn a_snapshot_of_a_stopped_qemu_fails_at_its_deadline_and_is_undone_when_qemu_answers() {
    let vm = ScratchVm::define("vmsnap-t12-stuck", ScratchOptions::default(), &[]);
    let bus = PrivateBus::start();
    let locks = tempfile::tempdir().unwrap();
    let config = format!(
        "failure_deadline = \"12s\"\nvm_lock_dir = \"{}\"\n{}",
        locks.path().display(),
        config_for(LAB_URI)
    );
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

    // The VM is released: nothing holds its lock (the libvirt hook would let it start)...
    let lock_file = locks.path().join(format!("{}.lock", vm.uuid()));
    let free = Command::new("flock")
        .args(["--nonblock", "--exclusive"])
        .arg(&lock_file)
        .arg("true")
        .status()
        .unwrap();
    assert!(free.success(), "the VM's lock is still held");
    // ...the given-up snapshot waits for its call before it can be deleted...
    let pending = daemon.ctl(&["snapshot", "delete", &vm.name, "stuck"]);
    let message = pending.failure();
    assert!(message.contains("given up at its deadline"), "{message}");
    // ...and the VM takes new work, which QEMU's silence blocks and the deadline gives up too.
    let meanwhile = daemon.ctl(&[
        "snapshot",
        "create",
        &vm.name,
        "meanwhile",
        "--output",
        "json",
    ]);
    assert_eq!(meanwhile.code, Some(1), "{meanwhile:?}");
    let meanwhile: serde_json::Value = serde_json::from_str(&meanwhile.stdout).unwrap();
    assert_eq!(
        meanwhile["errorName"], "org.vmsnap.VmSnap1.Error.DeadlineExceeded",
        "{meanwhile}"
    );
    let meanwhile_short = meanwhile["uuid"].as_str().unwrap()[..8].to_string();

    // QEMU answers again: the blocked calls return, what each snapshot did is undone, and the
    // VM takes new work.
    drop(stopped);
    let after = wait_for(Duration::from_secs(180), "the VM to take new work", || {
        let out = daemon.ctl(&["snapshot", "create", &vm.name, "after", "--output", "json"]);
        (out.code == Some(0)).then(|| out.json())
    });
    assert_eq!(after["phase"], "Succeeded", "{after}");
    for name in ["stuck", "meanwhile"] {
        let given_up = vmsnap_tests::show_snapshot(&daemon, &vm.name, name);
        assert_eq!(given_up["phase"], "Failed", "{given_up}");
        assert_eq!(given_up["readyToUse"], false, "{given_up}");
    }
    let leftovers: Vec<String> = vm
        .images()
        .into_iter()
        .filter(|f| f.contains(&short) || f.contains(&meanwhile_short))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the given-up snapshots left {leftovers:?}"
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
    // Both given-up snapshots are settled: deleting them removes their records.
    for name in ["stuck", "meanwhile"] {
        let deleted = daemon.ctl(&["snapshot", "delete", &vm.name, name]);
        assert_eq!(deleted.code, Some(0), "{deleted:?}");
    }
    virsh(&["destroy", &vm.name]);
}
