//! vmsnapd killed (abort, as SIGKILL or a power cut leaves it) at every journal step of a
//! snapshot create, a delete and a restore of a shut-off VM on qcow2, then started again. After
//! the restart settles what it found: every snapshot is settled, every other snapshot holds what
//! it held, the VM's disk holds what it should, every image in the VM's folder is used by the
//! VM's chain or named by a snapshot, and the VM starts.
//! (`VMSNAP_TEST_CRASH_AT_JOURNAL=N` makes vmsnapd abort at its Nth journal step: each record
//! write is two, just before and just after it.)
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use vmsnap_tests::{
    assert_every_image_used, config_for, flat_sum, image_of, journal_steps, restore_uuids,
    settled_restores, snapshot_list, virsh, wait_for, wait_in_inventory, write_pattern, Daemon,
    PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

/// What a scenario starts from: the content each snapshot holds and the VM's disk's.
struct Start {
    contents: Vec<(String, String)>,
    disk: String,
    /// Restores made before (earlier rounds share the state folder).
    restores: BTreeSet<String>,
}

/// s0 (data 0x11), then data 0x22 on the disk.
fn setup(daemon: &Daemon, vm: &ScratchVm) -> Start {
    write_pattern(&vm.disk_source(), 0x11, 1088);
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "s0", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    let s0 = flat_sum(&image_of(&taken));
    write_pattern(&vm.disk_source(), 0x22, 2176);
    Start {
        contents: vec![("s0".to_string(), s0)],
        disk: flat_sum(&vm.disk_source()),
        restores: restore_uuids(daemon),
    }
}

/// The checks after the restart settled everything.
fn check_settled(daemon: &Daemon, vm: &ScratchVm, start: &Start, step: &str) {
    // A restart settles in the background: wait until every restore and snapshot settled.
    settled_restores(daemon);
    let all = wait_for(Duration::from_secs(60), "every snapshot settled", || {
        let all = snapshot_list(daemon, &vm.name);
        all.iter()
            .all(|s| s["phase"] == "Succeeded" || s["phase"] == "Failed")
            .then_some(all)
    });
    for (name, content) in &start.contents {
        if let Some(s) = all.iter().find(|s| s["name"] == name.as_str()) {
            assert_eq!(&flat_sum(&image_of(s)), content, "{step}: {name} changed");
        }
    }
    assert_every_image_used(vm, &all, step);
    virsh(&["start", &vm.name]);
    virsh(&["destroy", &vm.name]);
}

/// Runs `op` once to count its journal steps, then once per step with vmsnapd dying there,
/// each on a fresh VM; `check` judges what the restart settled.
fn at_every_journal_step(
    name: &str,
    op: impl Fn(&Daemon, &ScratchVm),
    check: impl Fn(&Daemon, &ScratchVm, &Start, &str),
) {
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config_for(LAB_URI));
    let count = {
        let vm = ScratchVm::define(name, ScratchOptions::default(), &[]);
        wait_in_inventory(&daemon, &vm);
        setup(&daemon, &vm);
        let before = journal_steps(&daemon);
        op(&daemon, &vm);
        journal_steps(&daemon) - before
    };
    assert!(count >= 4, "only {count} journal steps");
    for crash_at in 1..=count {
        let vm = ScratchVm::define(name, ScratchOptions::default(), &[]);
        daemon.restart_with_env(&[]);
        wait_in_inventory(&daemon, &vm);
        let start = setup(&daemon, &vm);
        // The count starts with the daemon: from this start on, only the op's steps count.
        daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT_JOURNAL", &crash_at.to_string())]);
        wait_in_inventory(&daemon, &vm);
        op(&daemon, &vm);
        let status = daemon.wait_exit(Duration::from_secs(60));
        assert!(
            !status.success(),
            "step {crash_at}: vmsnapd did not die ({status})"
        );
        daemon.restart_with_env(&[]);
        let step = format!("{name}, died at journal step {crash_at} of {count}");
        check(&daemon, &vm, &start, &step);
    }
}

#[test]
fn a_create_interrupted_at_every_journal_step_settles() {
    at_every_journal_step(
        "vmsnap-t12-crash-create",
        |daemon, vm| {
            let _ = daemon.ctl(&["snapshot", "create", &vm.name, "s1"]);
        },
        |daemon, vm, start, step| {
            check_settled(daemon, vm, start, step);
            assert_eq!(
                flat_sum(&vm.disk_source()),
                start.disk,
                "{step}: the disk changed"
            );
            if let Some(s1) = snapshot_list(daemon, &vm.name)
                .into_iter()
                .find(|s| s["name"] == "s1" && s["phase"] == "Succeeded")
            {
                assert_eq!(flat_sum(&image_of(&s1)), start.disk, "{step}: s1's content");
            }
        },
    );
}

#[test]
fn a_delete_interrupted_at_every_journal_step_settles() {
    at_every_journal_step(
        "vmsnap-t12-crash-delete",
        |daemon, vm| {
            let _ = daemon.ctl(&["snapshot", "delete", &vm.name, "s0"]);
        },
        |daemon, vm, start, step| {
            check_settled(daemon, vm, start, step);
            assert_eq!(
                flat_sum(&vm.disk_source()),
                start.disk,
                "{step}: the disk changed"
            );
            // Settled either way; deleting it (again) finishes the job.
            if snapshot_list(daemon, &vm.name)
                .iter()
                .any(|s| s["name"] == "s0")
            {
                let again = daemon.ctl(&["snapshot", "delete", &vm.name, "s0"]);
                assert_eq!(again.code, Some(0), "{step}: {again:?}");
                check_settled(daemon, vm, start, step);
                assert_eq!(flat_sum(&vm.disk_source()), start.disk, "{step}");
            }
        },
    );
}

#[test]
fn a_restore_interrupted_at_every_journal_step_settles() {
    at_every_journal_step(
        "vmsnap-t12-crash-restore",
        |daemon, vm| {
            let _ = daemon.ctl(&["restore", &vm.name, "s0"]);
        },
        |daemon, vm, start, step| {
            check_settled(daemon, vm, start, step);
            let restores = daemon.ctl(&["restore", "list", "--output", "json"]).json();
            let last = restores
                .as_array()
                .unwrap()
                .iter()
                .find(|r| !start.restores.contains(r["uuid"].as_str().unwrap()))
                .cloned();
            let now = flat_sum(&vm.disk_source());
            let s0 = &start.contents[0].1;
            match last {
                Some(r) if r["phase"] == "Succeeded" => {
                    assert_eq!(&now, s0, "{step}: restored, but not to s0's data")
                }
                _ => assert_eq!(
                    now, start.disk,
                    "{step}: not restored, but the disk changed"
                ),
            }
        },
    );
}
