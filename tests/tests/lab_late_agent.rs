//! A thaw that sticks: the guest agent stops answering just before a snapshot and resumes a
//! minute later, when it may run the freeze it had queued. The snapshot is bounded and says
//! QuiesceFailed; the guest must end thawed without anyone's help, and stay so.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use vmsnap_tests::{
    config_for, guest_exec, virsh, wait_for, Daemon, PrivateBus, ScratchVm, LAB_URI,
};

/// "frozen", "thawed", or None while the agent does not answer.
fn freeze_status(vm: &str) -> Option<String> {
    let out = std::process::Command::new("virsh")
        .args(["-c", LAB_URI, "qemu-agent-command", "--timeout", "5", vm])
        .arg(r#"{"execute":"guest-fsfreeze-status"}"#)
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    reply["return"].as_str().map(str::to_string)
}

#[test]
fn a_guest_whose_agent_answers_a_minute_late_ends_thawed() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t12-late");
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vm.write_file("f1", 64 << 10);
    // The agent stops for 60 s, detached from the guest-exec that asks for it.
    vm.exec(
        "setsid sh -c 'sleep 1; kill -STOP $(pidof qemu-ga); sleep 60; kill -CONT $(pidof qemu-ga)' \
         </dev/null >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_secs(2));
    let stopped = Instant::now();

    let snap = daemon
        .ctl(&["snapshot", "create", &vm.name, "late", "--output", "json"])
        .json();
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    let indications: Vec<&str> = snap["indications"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.as_str())
        .collect();
    assert!(indications.contains(&"QuiesceFailed"), "{snap}");
    assert!(
        stopped.elapsed() < Duration::from_secs(50),
        "the snapshot did not wait for the agent"
    );

    // The agent answers again; the guest must be (or soon be) thawed without anyone asking.
    wait_for(
        Duration::from_secs(120),
        "the agent to answer again",
        || freeze_status(&vm.name),
    );
    wait_for(Duration::from_secs(30), "the guest to be thawed", || {
        (freeze_status(&vm.name).as_deref() == Some("thawed")).then_some(())
    });
    // And it stays thawed: the guest can write.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(freeze_status(&vm.name).as_deref(), Some("thawed"));
    let (code, out) = guest_exec(
        &vm.name,
        "echo after > /mnt/data/f2 && sync && cat /mnt/data/f2",
        Duration::from_secs(30),
    );
    assert_eq!((code, out.trim()), (0, "after"));
    assert!(virsh(&["domstate", &vm.name]).contains("running"));
}
