//! vmsnap-lvm against real LVM: this host's kernel has no device-mapper, so a scratch TCG VM of
//! the lab (its initramfs has the dm modules, lvm and dmsetup) gets a second, raw 1 GiB disk
//! (vdb) and the `vmsnap-lvm-selftest` binary on its data disk, and runs the self-test there
//! through the guest agent. The self-test takes vdb over (VG, thin pool, thin LVs of 64 MiB and
//! 1 GiB, a thick LV) and prints `CHECK`/`TIME` lines; this test asserts every check passed and
//! prints the timings (`cargo test -p vmsnap-tests --test guests lvm_selftest -- --nocapture`).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use vmsnap_tests::{bin, guest_exec, GuestSlot, ScratchOptions, ScratchVm};

const VM: &str = "vmsnap-lvm-selftest";
const SELFTEST: &str = "vmsnap-lvm-selftest";

/// Every check the self-test must report as ok.
const CHECKS: &[&str] = &[
    "thin_64MiB_snapshot_active_tagged",
    "thin_64MiB_snapshot_keeps_data",
    "thin_64MiB_restore_brings_data_back",
    "thin_64MiB_restored_origin_clean",
    "thin_1GiB_snapshot_active_tagged",
    "thin_1GiB_snapshot_keeps_data",
    "thin_1GiB_restore_brings_data_back",
    "thin_1GiB_restored_origin_clean",
    "thin_crash_before_create-new",
    "thin_crash_before_rename-origin-to-old",
    "thin_crash_before_rename-new-to-origin",
    "thin_crash_before_remove-old",
    "thin_crash_before_untag",
    "thin_recovery_refuses_foreign_lv",
    "thin_restore_refuses_leftovers",
    "thick_snapshot_created",
    "thick_snapshot_keeps_data",
    "thick_fill_percent",
    "thick_restore_brings_data_back",
    "thick_snapshot_retaken",
    "thick_crash_before_retake",
    "lvm_error_message_one_line",
    "missing_lv_not_found",
    "missing_vg_is_lvm_error",
    "reserved_name_refused_before_lvm",
    "lvs_tagged_lists_snapshots",
    "resolve_device /dev/vmsnaptest/disk-big.snap1",
    "resolve_device /dev/mapper/vmsnaptest-disk--big.snap1",
    "thick_overflow_detected_invalid",
    "thick_restore_refuses_invalid",
    "thick_other_snapshot_still_valid",
    "delete_removes_only_the_snapshot",
];

#[test]
fn lvm_operations_in_a_guest() {
    let _slot = GuestSlot::take();
    let selftest = std::fs::read(bin(SELFTEST)).unwrap();
    let vm = ScratchVm::define(
        VM,
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
        &[(SELFTEST, &selftest)],
    );
    vm.attach_raw_disk("vdb", 1 << 30);
    vm.start(true);

    let (code, out) = guest_exec(
        VM,
        &format!("chmod 755 /mnt/data/{SELFTEST} && /mnt/data/{SELFTEST} /dev/vdb 2>&1"),
        Duration::from_secs(600),
    );
    println!("{out}");
    for timing in out.lines().filter_map(|l| l.strip_prefix("TIME ")) {
        eprintln!("lvm timing: {timing}");
    }
    let failed: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" FAIL") || l.starts_with("ERROR"))
        .collect();
    assert!(failed.is_empty(), "self-test failures: {failed:#?}\n{out}");
    for check in CHECKS {
        assert!(
            out.lines().any(|l| l == format!("CHECK {check} ok")),
            "check {check:?} missing from the self-test output:\n{out}"
        );
    }
    assert!(out.lines().any(|l| l == "SELFTEST PASS"), "{out}");
    assert_eq!(code, 0, "{out}");
}
