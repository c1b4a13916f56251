//! The Agent property follows qemu-ga inside a real guest going away and coming back. A test
//! binary of its own: cargo runs test binaries one after another, so no other test sees the
//! lab's agent down.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vmsnap_tests::{
    config_for, find_vm, guest_exec, require_lab, wait_for, Daemon, PrivateBus, LAB_AGENT_VM,
    LAB_URI,
};

fn agent_state(daemon: &Daemon) -> String {
    let list = daemon.ctl(&["vm", "list", "--output", "json"]).json();
    find_vm(&list, LAB_AGENT_VM).unwrap()["agent"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn agent_disconnect_and_reconnect_are_followed() {
    require_lab();
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    assert_eq!(agent_state(&daemon), "connected");

    // The guest stops its agent and starts it again a few seconds later, detached from the
    // guest-exec call that asked for it.
    let (code, _) = guest_exec(
        LAB_AGENT_VM,
        "setsid sh -c 'sleep 1; killall qemu-ga; sleep 6; \
         qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -d' \
         </dev/null >/dev/null 2>&1 &",
        Duration::from_secs(20),
    );
    assert_eq!(code, 0);
    wait_for(Duration::from_secs(20), "Agent=disconnected", || {
        (agent_state(&daemon) == "disconnected").then_some(())
    });
    wait_for(Duration::from_secs(40), "Agent=connected again", || {
        (agent_state(&daemon) == "connected").then_some(())
    });
    // And the agent really answers again.
    let (code, out) = guest_exec(LAB_AGENT_VM, "echo back", Duration::from_secs(20));
    assert_eq!((code, out.as_str()), (0, "back\n"));
}
