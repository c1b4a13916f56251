//! vmsnapd killed (abort) at every journal step of a snapshot create and a delete of a RUNNING
//! VM with its guest agent (the freeze, QEMU's snapshot and block commit), then started again.
//! After the restart settles what it found: every snapshot is settled, the guest is not frozen
//! and sees exactly the files it wrote, the kept snapshot holds what it held, and every image in
//! the VM's folder is used by the VM's chain or named by a snapshot.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vmsnap_tests::{
    assert_every_image_used, config_for, flat_sum, image_of, journal_steps, snapshot_list,
    wait_for, wait_in_inventory, Daemon, PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

/// Where a round starts: snapshot s0 holds `s0` (its image's flat content), the guest has
/// written files since, which it sees as `files`.
struct Start {
    s0: String,
    files: String,
}

/// One round's starting point: no snapshot, then s0, then a file written after it.
fn setup(daemon: &Daemon, vm: &ScratchVm, round: usize) -> Start {
    for s in snapshot_list(daemon, &vm.name) {
        let out = daemon.ctl(&["snapshot", "delete", &vm.name, s["name"].as_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{out:?}");
    }
    vm.write_file(&format!("f{round}-before"), 65536);
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "s0", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    vm.write_file(&format!("f{round}-after"), 65536);
    Start {
        s0: flat_sum(&image_of(&taken)),
        files: vm.guest_checksums(),
    }
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
            _ => daemon.ctl(&["snapshot", "delete", &vm.name, "s0"]),
        };
    };
    setup(&daemon, &vm, 0);
    let before = journal_steps(&daemon);
    run_op(&daemon);
    let count = journal_steps(&daemon) - before;
    assert!(count >= 4, "only {count} journal steps");
    for crash_at in 1..=count {
        let start = setup(&daemon, &vm, crash_at);
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
}

#[test]
fn an_online_create_interrupted_at_every_journal_step_settles() {
    at_every_journal_step("vmsnap-t12-crash-online-create", "create");
}

#[test]
fn an_online_delete_interrupted_at_every_journal_step_settles() {
    at_every_journal_step("vmsnap-t12-crash-online-delete", "delete");
}
