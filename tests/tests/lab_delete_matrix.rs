//! The delete matrix: four snapshots on a branched history (a restore in place, and a restore
//! as a new VM that is then undefined with its disk kept), deleted in every order, offline.
//! After every delete: every other snapshot holds what it held when it was taken, the VM's disk
//! and the undefined VM's disk hold what they held, and the VM starts (its definition names a
//! chain QEMU can open).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use vmsnap_tests::{
    config_for, flat_sum, image_of, show_snapshot, virsh, wait_in_inventory, write_pattern, Daemon,
    PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut all = Vec::new();
    for (i, first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, *first);
            all.push(tail);
        }
    }
    all
}

struct History {
    vm: ScratchVm,
    copy_disk: String,
    /// Snapshot name to the content it holds.
    contents: BTreeMap<String, String>,
    vm_content: String,
    copy_content: String,
}

fn snapshot(daemon: &Daemon, vm: &str, name: &str) {
    let taken = daemon
        .ctl(&["snapshot", "create", vm, name, "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
}

/// s1, s2; back to s1 in place; s3; s2 as a new VM; s4; the new VM undefined (its disk kept and
/// written to, as a copy made by hand would be).
fn branched_history(daemon: &Daemon, slot: usize) -> History {
    let name = format!("vmsnap-t12-matrix{slot}");
    let copy = format!("{name}-copy");
    let _ = std::process::Command::new("virsh")
        .args(["-c", LAB_URI, "undefine", &copy])
        .output();
    let vm = ScratchVm::define(&name, ScratchOptions::default(), &[]);
    wait_in_inventory(daemon, &vm);
    write_pattern(&vm.disk_source(), 0x11, 1088);
    snapshot(daemon, &vm.name, "s1");
    write_pattern(&vm.disk_source(), 0x22, 2176);
    snapshot(daemon, &vm.name, "s2");
    let back = daemon.ctl(&["restore", &vm.name, "s1", "--no-safety-snapshot"]);
    assert_eq!(back.code, Some(0), "{back:?}");
    write_pattern(&vm.disk_source(), 0x33, 3264);
    snapshot(daemon, &vm.name, "s3");
    let cloned = daemon
        .ctl(&[
            "restore", &vm.name, "s2", "--target", &copy, "--output", "json",
        ])
        .json();
    assert_eq!(cloned["phase"], "Succeeded", "{cloned}");
    let copy_disk = cloned["restores"][0]["toImage"]
        .as_str()
        .unwrap()
        .to_string();
    write_pattern(&vm.disk_source(), 0x44, 4352);
    snapshot(daemon, &vm.name, "s4");
    write_pattern(&vm.disk_source(), 0x55, 5440);
    virsh(&["undefine", &copy]);
    write_pattern(&copy_disk, 0x66, 6528);
    let contents = ["s1", "s2", "s3", "s4"]
        .iter()
        .map(|s| {
            let image = image_of(&show_snapshot(daemon, &vm.name, s));
            (s.to_string(), flat_sum(&image))
        })
        .collect();
    History {
        vm_content: flat_sum(&vm.disk_source()),
        copy_content: flat_sum(&copy_disk),
        vm,
        copy_disk,
        contents,
    }
}

fn check(daemon: &Daemon, history: &History, deleted: &[&str], step: &str) {
    assert!(
        std::path::Path::new(&history.copy_disk).exists(),
        "{step}: the undefined VM's disk {} is gone",
        history.copy_disk
    );
    for (name, content) in &history.contents {
        if deleted.contains(&name.as_str()) {
            continue;
        }
        let image = image_of(&show_snapshot(daemon, &history.vm.name, name));
        assert_eq!(&flat_sum(&image), content, "{step}: {name} changed");
    }
    assert_eq!(
        flat_sum(&history.vm.disk_source()),
        history.vm_content,
        "{step}: the VM's disk changed"
    );
    assert_eq!(
        flat_sum(&history.copy_disk),
        history.copy_content,
        "{step}: the undefined VM's disk changed"
    );
    virsh(&["start", &history.vm.name]);
    virsh(&["destroy", &history.vm.name]);
}

fn run_orders(daemon: &Daemon, slot: usize, orders: &[Vec<usize>]) {
    let names = ["s1", "s2", "s3", "s4"];
    for order in orders {
        let history = branched_history(daemon, slot);
        let mut deleted = Vec::new();
        for &i in order {
            let step = format!("order {order:?}, deleting {}", names[i]);
            let out = daemon.ctl(&["snapshot", "delete", &history.vm.name, names[i]]);
            assert_eq!(out.code, Some(0), "{step}: {out:?}");
            deleted.push(names[i]);
            check(daemon, &history, &deleted, &step);
        }
    }
}

#[test]
fn every_order_of_deleting_four_snapshots_on_branched_history_keeps_every_content() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    let orders = permutations(&[0, 1, 2, 3]);
    assert_eq!(orders.len(), 24);
    // Two VMs at a time: the work is mostly qemu-img and libvirt, on two cores.
    let (even, odd): (Vec<_>, Vec<_>) = orders
        .iter()
        .cloned()
        .enumerate()
        .partition(|(n, _)| n % 2 == 0);
    let even: Vec<Vec<usize>> = even.into_iter().map(|(_, o)| o).collect();
    let odd: Vec<Vec<usize>> = odd.into_iter().map(|(_, o)| o).collect();
    std::thread::scope(|scope| {
        scope.spawn(|| run_orders(&daemon, 0, &even));
        scope.spawn(|| run_orders(&daemon, 1, &odd));
    });
}
