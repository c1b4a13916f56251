//! vmsnapd killed while a delete merges a lower layer of a running VM's chain: QEMU finishes the
//! block commit on its own. The restarted daemon recognises the merge as done from the live
//! chain (rather than merging again into an image the VM holds) and finishes the delete; every
//! other snapshot and the live disk keep their content.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vmsnap_tests::{
    config_for, image_checksums, image_of, show_snapshot as show, wait_for, Daemon, PrivateBus,
    ScratchVm, LAB_URI,
};

#[test]
fn a_delete_killed_mid_merge_of_a_lower_layer_finishes_on_restart() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t12-midmerge");
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config_for(LAB_URI));
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    let mut sums = Vec::new();
    for name in ["m1", "m2", "m3"] {
        vm.write_file(&format!("f-{name}"), 512 << 10);
        sums.push(vm.guest_checksums());
        let out = daemon
            .ctl(&["snapshot", "create", &vm.name, name, "--output", "json"])
            .json();
        assert_eq!(out["phase"], "Succeeded", "{out}");
    }
    vm.write_file("f-live", 64 << 10);
    let live = vm.guest_checksums();

    // Deleting m1 merges the layer above its image (not the live top) down: killed once the
    // block commit is under way.
    daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT", "delete-mid-merge")]);
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    let _ = daemon.ctl(&["snapshot", "delete", &vm.name, "m1", "--no-wait"]);
    assert!(!daemon.wait_exit(Duration::from_secs(60)).success());
    // QEMU completes the commit alone; give it a moment before vmsnapd comes back.
    std::thread::sleep(Duration::from_secs(3));
    daemon.restart_with_env(&[]);
    wait_for(
        Duration::from_secs(120),
        "the interrupted delete to finish",
        || {
            let out = daemon.ctl(&["snapshot", "show", &vm.name, "m1", "--output", "json"]);
            match out.code {
                Some(1) => Some(()),
                _ => {
                    let shown = out.json();
                    assert_ne!(shown["phase"], "Failed", "{shown}\n{}", daemon.log_text());
                    None
                }
            }
        },
    );
    for (name, expected) in [("m2", &sums[1]), ("m3", &sums[2])] {
        let snap = show(&daemon, &vm.name, name);
        assert_eq!(snap["phase"], "Succeeded", "{snap}");
        assert_eq!(
            &image_checksums(&image_of(&snap)),
            expected,
            "snapshot {name}"
        );
    }
    assert_eq!(vm.guest_checksums(), live, "the live disk");
    // One image per remaining snapshot plus the live top: nothing left over.
    assert_eq!(vm.images().len(), 3, "{:?}", vm.images());
    assert!(
        !daemon.log_text().contains("write\" lock"),
        "{}",
        daemon.log_text()
    );
}
