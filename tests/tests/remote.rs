//! `vmsnapctl -H [USER@]HOST[:PORT]`: the same commands against vmsnapd of another hypervisor
//! over SSH (D-Bus through `ssh ... systemd-stdio-bridge`), tested against the lab's own sshd on
//! 127.0.0.1:2222 (lab/sshd.sh) and a vmsnapd on a private bus that the remote side reaches.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

use vmsnap_tests::{bin, config_for, lab_dir, Daemon, PrivateBus};

const HOST: &str = "root@127.0.0.1:2222";

fn ssh_wrapper() -> std::path::PathBuf {
    let wrapper = lab_dir().join("ssh/ssh");
    assert!(
        wrapper.exists(),
        "{} is missing: bring the lab's sshd up with lab/sshd.sh (lab/up.sh runs it)",
        wrapper.display()
    );
    wrapper
}

/// vmsnapctl -H HOST against `daemon`'s bus (named on the remote side), with `input` on stdin.
fn remote(daemon: &Daemon, host: &str, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(bin("vmsnapctl"))
        .args(["-H", host, "--bus-address", &daemon.bus_address])
        .args(args)
        .env_remove("VMSNAP_BUS_ADDRESS")
        .env_remove("VMSNAP_HOST")
        .env("VMSNAP_SSH", ssh_wrapper())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_same_commands_over_ssh() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));

    let out = remote(&daemon, HOST, &["vm", "list", "-o", "json"], "");
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(vmsnap_tests::find_vm(&list, "test").is_some(), "{list}");

    // apply, get and delete over ssh, as locally.
    let manifest = "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\n\
                    metadata:\n  name: remote-a\nspec:\n  source:\n    apiGroup: kubevirt.io\n    \
                    kind: VirtualMachine\n    name: test\n";
    let out = remote(&daemon, HOST, &["apply", "-f", "-"], manifest);
    assert_eq!(
        text(&out.stdout),
        "virtualmachinesnapshot.snapshot.kubevirt.io/remote-a created\n",
        "{out:?}"
    );
    // The same object, seen locally.
    let local = daemon.ctl(&["get", "vmsnapshot", "remote-a", "-o", "name"]);
    assert_eq!(
        local.ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/remote-a\n"
    );
    let out = remote(&daemon, HOST, &["get", "vmsnapshot", "-o", "name"], "");
    assert_eq!(
        text(&out.stdout),
        "virtualmachinesnapshot.snapshot.kubevirt.io/remote-a\n"
    );
    let out = remote(&daemon, HOST, &["delete", "vmsnapshot", "remote-a"], "");
    assert!(out.status.success(), "{out:?}");

    // VMSNAP_HOST works as -H does.
    let out = Command::new(bin("vmsnapctl"))
        .args(["--bus-address", &daemon.bus_address, "vm", "list"])
        .env("VMSNAP_HOST", HOST)
        .env("VMSNAP_SSH", ssh_wrapper())
        .env_remove("VMSNAP_BUS_ADDRESS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("test"));

    // A host that does not answer, and a bad -H: exit 1 with the reason.
    let out = remote(&daemon, "root@127.0.0.1:1", &["vm", "list"], "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("of root@127.0.0.1:1 (over ssh)"),
        "{stderr}"
    );
    // An ssh option in place of a host is refused before ssh runs.
    let out = Command::new(bin("vmsnapctl"))
        .args(["--host=-oProxyCommand=touch /tmp/x", "vm", "list"])
        .env("VMSNAP_SSH", ssh_wrapper())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("must not start with '-'"),
        "{out:?}"
    );
}
