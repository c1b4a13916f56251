//! vmsnapd killed (abort) at every journal step of a snapshot create, a delete and a restore
//! (`--stop`: vmsnapd shuts the guest down first) of a RUNNING VM with its guest agent (the
//! freeze, QEMU's snapshot and block commit), then started again. After the restart settles what
//! it found: every snapshot and restore is settled, the guest is not frozen and sees exactly the
//! files it should (those it wrote, or the snapshot's after a restore that succeeded), the kept
//! snapshot holds what it held, and every image in the VM's folder is used by the VM's chain or
//! named by a snapshot.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use vmsnap_tests::{
    assert_every_image_used, config_for, flat_sum, image_of, journal_steps, restore_uuids,
    settled_restores, snapshot_list, virsh, wait_for, wait_in_inventory, Daemon, PrivateBus,
    ScratchOptions, ScratchVm, LAB_URI,
};

/// Where a round starts: snapshot s0 holds `s0` (its image's flat content) and the guest saw
/// `s0_files` then; it has written files since, which it sees as `files`.
struct Start {
    s0: String,
    s0_files: String,
    files: String,
}

/// One round's starting point: no snapshot, then s0, then a file written after it.
fn setup(daemon: &Daemon, vm: &ScratchVm, round: usize) -> Start {
    for s in snapshot_list(daemon, &vm.name) {
        let out = daemon.ctl(&["snapshot", "delete", &vm.name, s["name"].as_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{out:?}");
    }
    vm.write_file(&format!("f{round}-before"), 65536);
    let s0_files = vm.guest_checksums();
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "s0", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    vm.write_file(&format!("f{round}-after"), 65536);
    Start {
        s0: flat_sum(&image_of(&taken)),
        s0_files,
        files: vm.guest_checksums(),
    }
}

/// After a restore's round: every restore settled; the guest (started again if the restore
/// left it shut off) sees s0's files if the new restore succeeded, its own otherwise. Returns
/// whether it succeeded.
fn check_restore(
    daemon: &Daemon,
    vm: &ScratchVm,
    start: &Start,
    before: &BTreeSet<String>,
    step: &str,
) -> bool {
    let restores = settled_restores(daemon);
    let succeeded = restores
        .iter()
        .any(|r| !before.contains(r["uuid"].as_str().unwrap()) && r["phase"] == "Succeeded");
    if virsh(&["domstate", &vm.name]).trim() != "running" {
        vm.start(true);
    }
    vmsnap_tests::wait_agent_connected(daemon, &vm.name);
    let expected = Start {
        s0: start.s0.clone(),
        s0_files: start.s0_files.clone(),
        files: if succeeded {
            start.s0_files.clone()
        } else {
            start.files.clone()
        },
    };
    check(daemon, vm, &expected, step, false);
    succeeded
}

fn check(daemon: &Daemon, vm: &ScratchVm, start: &Start, step: &str, s0_deleted: bool) {
    let all = wait_for(Duration::from_secs(120), "every snapshot settled", || {
        let all = snapshot_list(daemon, &vm.name);
        all.iter()
            .all(|s| s["phase"] == "Succeeded" || s["phase"] == "Failed")
            .then_some(all)
    });
    // Not frozen: a write in the guest's frozen filesystem would hang.
    vm.exec("timeout 20 sh -c 'echo thawed > /mnt/data/thaw-check && sync'");
    vm.exec("rm -f /mnt/data/thaw-check && sync");
    assert_eq!(
        vm.guest_checksums(),
        start.files,
        "{step}: the guest's files changed"
    );
    match all.iter().find(|s| s["name"] == "s0") {
        Some(s0) if s0["phase"] == "Succeeded" => {
            assert_eq!(flat_sum(&image_of(s0)), start.s0, "{step}: s0 changed")
        }
        Some(_) => {}
        None => assert!(s0_deleted, "{step}: s0 is gone"),
    }
    assert_every_image_used(vm, &all, step);
}

fn at_every_journal_step(name: &str, op: &str) {
    let vm = ScratchVm::define(
        name,
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
        &[],
    );
    vm.start(true);
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config_for(LAB_URI));
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    let run_op = |daemon: &Daemon| {
        let _ = match op {
            "create" => daemon.ctl(&["snapshot", "create", &vm.name, "s1"]),
            "restore" => daemon.ctl(&["restore", &vm.name, "s0", "--stop"]),
            _ => daemon.ctl(&["snapshot", "delete", &vm.name, "s0"]),
        };
    };
    setup(&daemon, &vm, 0);
    let before = journal_steps(&daemon);
    run_op(&daemon);
    let count = journal_steps(&daemon) - before;
    if op == "restore" {
        vm.start(true);
    }
    assert!(count >= 4, "only {count} journal steps");
    // Restores finished by the restart, and rolled back by it.
    let (mut finished, mut rolled_back) = (0, 0);
    for crash_at in 1..=count {
        let start = setup(&daemon, &vm, crash_at);
        let restores = restore_uuids(&daemon);
        daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT_JOURNAL", &crash_at.to_string())]);
        wait_in_inventory(&daemon, &vm);
        vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
        run_op(&daemon);
        let status = daemon.wait_exit(Duration::from_secs(120));
        assert!(
            !status.success(),
            "step {crash_at}: vmsnapd did not die ({status})"
        );
        daemon.restart_with_env(&[]);
        let step = format!("online {op}, died at journal step {crash_at} of {count}");
        if op == "restore" {
            if check_restore(&daemon, &vm, &start, &restores, &step) {
                finished += 1;
            } else {
                rolled_back += 1;
            }
            continue;
        }
        check(&daemon, &vm, &start, &step, op == "delete");
        if op == "delete"
            && snapshot_list(&daemon, &vm.name)
                .iter()
                .any(|s| s["name"] == "s0")
        {
            // Settled either way; deleting it (again) finishes the job.
            let again = daemon.ctl(&["snapshot", "delete", &vm.name, "s0"]);
            assert_eq!(again.code, Some(0), "{step}: {again:?}");
            check(&daemon, &vm, &start, &step, true);
        }
    }
    if op == "restore" {
        assert!(
            finished > 0 && rolled_back > 0,
            "{finished} restores finished and {rolled_back} rolled back: both paths must be crossed"
        );
    }
}

#[test]
fn an_online_create_interrupted_at_every_journal_step_settles() {
    at_every_journal_step("vmsnap-t12-crash-online-create", "create");
}

#[test]
fn an_online_delete_interrupted_at_every_journal_step_settles() {
    at_every_journal_step("vmsnap-t12-crash-online-delete", "delete");
}

#[test]
fn an_online_restore_interrupted_at_every_journal_step_settles() {
    at_every_journal_step("vmsnap-t12-crash-online-restore", "restore");
}
