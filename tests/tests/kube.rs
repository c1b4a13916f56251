//! KubeVirt's objects through vmsnapctl against a real vmsnapd on a private bus, with libvirt's
//! test driver (no guest: a snapshot there ends Failed, which is an object all the same):
//! `apply -f` refusals change nothing, `get` in every format, the round trip of `get -o yaml`
//! into `apply` (unchanged), immutability, `wait`, `delete`, exit codes and a closed pipe.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use vmsnap_tests::{bin, config_for, snapshot_manifest, wait_for, CtlOutput, Daemon, PrivateBus};

/// vmsnapctl with `input` on standard input.
fn ctl_stdin(daemon: &Daemon, args: &[&str], input: &str) -> CtlOutput {
    vmsnap_tests::ctl_with_input(&daemon.bus_address, args, input)
}

fn daemon() -> (PrivateBus, Daemon) {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));
    (bus, daemon)
}

/// Waits until the snapshot has left InProgress (on the test driver it ends Failed).
fn wait_settled(daemon: &Daemon, name: &str) -> serde_json::Value {
    wait_for(Duration::from_secs(30), "the snapshot to settle", || {
        let object = daemon
            .ctl(&["get", "vmsnapshot", name, "-o", "json"])
            .json();
        (object["status"]["phase"] != "InProgress").then_some(object)
    })
}

#[test]
fn refused_manifests_create_nothing() {
    let (_bus, daemon) = daemon();
    let good = snapshot_manifest("s1", "test");
    let refused = [
        (
            format!("{good}  deletionPolicy: Retain\n"),
            "spec.deletionPolicy Retain",
        ),
        (format!("{good}  color: blue\n"), "unknown field \"spec.color\""),
        (good.replace("kubevirt.io\n", "cdi.kubevirt.io\n"), "spec.source.apiGroup"),
        (
            good.replace("kind: VirtualMachine\n", "kind: VirtualMachineInstance\n"),
            "spec.source.kind",
        ),
        (good.replace("v1alpha1", "v2"), "apiVersion"),
        (good.replace("kind: VirtualMachineSnapshot", "kind: Pod"), "kind \"Pod\""),
        (
            "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineRestore\nmetadata:\n  \
             name: r\nspec:\n  target: {apiGroup: kubevirt.io, kind: VirtualMachine, name: test}\n  \
             virtualMachineSnapshotName: s1\n  volumeRestorePolicy: InPlace\n"
                .to_string(),
            "spec.volumeRestorePolicy",
        ),
        (
            "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineRestore\nmetadata:\n  \
             name: r\nspec:\n  target: {apiGroup: kubevirt.io, kind: VirtualMachine, name: test}\n  \
             virtualMachineSnapshotName: s1\n  patches: ['{}']\n"
                .to_string(),
            "spec.patches",
        ),
        // A good document followed by a bad one: the good one is not created either.
        (
            format!("{good}---\n{}", good.replace("name: s1", "name: s2").replace("Machine\n    name", "Machine\n    nam")),
            "document 2",
        ),
    ];
    for (manifest, words) in refused {
        let out = ctl_stdin(&daemon, &["apply", "-f", "-"], &manifest);
        let message = out.failure();
        assert!(message.contains(words), "{message:?} lacks {words:?}");
    }
    let list = daemon.ctl(&["get", "vmsnapshot", "-o", "json"]).json();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"], serde_json::json!([]), "{list}");
    let table = daemon.ctl(&["get", "vmsnapshot"]);
    assert_eq!(table.code, Some(0));
    assert_eq!(table.stdout, "");
    assert_eq!(table.stderr.trim(), "No resources found");

    // A VM that does not exist: refused by vmsnapd, nothing created.
    let out = ctl_stdin(
        &daemon,
        &["apply", "-f", "-"],
        &snapshot_manifest("s1", "nope"),
    );
    assert!(out.failure().contains("nope"), "{out:?}");
}

#[test]
fn get_formats_round_trip_immutability_wait_and_delete() {
    let (_bus, daemon) = daemon();
    let manifest = snapshot_manifest("snap-a", "test");
    let out = ctl_stdin(&daemon, &["apply", "-f", "-"], &manifest);
    assert_eq!(
        out.ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/snap-a created\n"
    );
    let object = wait_settled(&daemon, "snap-a");
    assert_eq!(object["apiVersion"], "snapshot.kubevirt.io/v1beta1");
    assert_eq!(object["kind"], "VirtualMachineSnapshot");
    assert_eq!(object["metadata"]["name"], "snap-a");
    assert_eq!(object["spec"]["source"]["name"], "test");
    assert_eq!(object["status"]["phase"], "Failed", "{object}");
    assert_eq!(object["status"]["readyToUse"], false);
    assert!(object["status"]["error"]["message"].as_str().unwrap().len() > 3);
    let uid = object["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(
        object["status"]["virtualMachineSnapshotContentName"],
        format!("vmsnapshot-content-{uid}")
    );

    // The same manifest again, and the object as get prints it: unchanged.
    let again = ctl_stdin(&daemon, &["apply", "-f", "-"], &manifest);
    assert_eq!(
        again.ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/snap-a unchanged\n"
    );
    for format in ["yaml", "json"] {
        let printed = daemon
            .ctl(&["get", "vmsnapshot", "snap-a", "-o", format])
            .ok()
            .to_string();
        let out = ctl_stdin(&daemon, &["apply", "-f", "-"], &printed);
        assert_eq!(
            out.ok(),
            "virtualmachinesnapshot.snapshot.kubevirt.io/snap-a unchanged\n",
            "{printed}"
        );
    }
    // The whole list too.
    let list = daemon
        .ctl(&["get", "vmsnapshots", "-o", "yaml"])
        .ok()
        .to_string();
    assert!(list.contains("kind: List"), "{list}");
    assert_eq!(
        ctl_stdin(&daemon, &["apply", "-f", "-"], &list).ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/snap-a unchanged\n"
    );

    // A changed spec is refused as immutable; nothing is created.
    let moved = manifest.replace("name: test", "name: other");
    let message = ctl_stdin(&daemon, &["apply", "-f", "-"], &moved)
        .failure()
        .to_string();
    assert!(message.contains("spec is immutable"), "{message}");
    let description = format!(
        "{}  annotations:\n    snapshot.vmsnap.org/description: changed\n{}",
        &manifest[..manifest.find("spec:").unwrap()],
        &manifest[manifest.find("spec:").unwrap()..]
    );
    let message = ctl_stdin(&daemon, &["apply", "-f", "-"], &description)
        .failure()
        .to_string();
    assert!(message.contains("description"), "{message}");

    // Table, wide, name, the content object, names as oc accepts them.
    let table = daemon.ctl(&["get", "vmsnapshot"]).ok().to_string();
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "SOURCEKIND",
            "SOURCENAME",
            "PHASE",
            "READYTOUSE",
            "CREATIONTIME",
            "ERROR"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row[..5],
        ["snap-a", "VirtualMachine", "test", "Failed", "false"]
    );
    let no_headers = daemon
        .ctl(&[
            "get",
            "virtualmachinesnapshots.snapshot.kubevirt.io",
            "--no-headers",
        ])
        .ok()
        .to_string();
    assert!(no_headers.starts_with("snap-a "), "{no_headers}");
    let wide = daemon
        .ctl(&["get", "vmsnapshot", "-o", "wide"])
        .ok()
        .to_string();
    let wide_header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(wide_header[7..], ["INDICATIONS", "UID"], "{wide}");
    assert!(wide.contains(&uid), "{wide}");
    assert_eq!(
        daemon.ctl(&["get", "vmsnapshot", "-o", "name"]).ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/snap-a\n"
    );
    let content = daemon
        .ctl(&[
            "get",
            "vmsnapshotcontent",
            &format!("vmsnapshot-content-{uid}"),
            "-o",
            "json",
        ])
        .json();
    assert_eq!(content["kind"], "VirtualMachineSnapshotContent");
    // The content as get prints it applies unchanged; one that does not exist is refused.
    let printed = daemon
        .ctl(&["get", "vmsnapshotcontent", "-o", "yaml"])
        .ok()
        .to_string();
    assert_eq!(
        ctl_stdin(&daemon, &["apply", "-f", "-"], &printed).ok(),
        format!("virtualmachinesnapshotcontent.snapshot.kubevirt.io/vmsnapshot-content-{uid} unchanged\n")
    );
    let made_up = printed.replace(&uid, "00000000-0000-4000-8000-000000000000");
    let message = ctl_stdin(&daemon, &["apply", "-f", "-"], &made_up)
        .failure()
        .to_string();
    assert!(message.contains("cannot be created"), "{message}");
    assert_eq!(content["spec"]["virtualMachineSnapshotName"], "snap-a");
    assert_eq!(content["spec"]["source"]["virtualMachine"]["name"], "test");

    // Not found: kubectl's words, exit 1.
    let missing = daemon.ctl(&["get", "vmsnapshot", "nope"]);
    assert_eq!(
        missing.failure(),
        "vmsnapctl: virtualmachinesnapshots.snapshot.kubevirt.io \"nope\" not found"
    );
    let unknown = daemon.ctl(&["get", "pods"]);
    assert!(unknown.failure().contains("\"pods\""));

    // wait: a Failed snapshot meets Failure at once, times out on Ready.
    assert_eq!(
        daemon
            .ctl(&["wait", "--for=condition=Failure", "vmsnapshot/snap-a"])
            .ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/snap-a condition met\n"
    );
    let started = std::time::Instant::now();
    let timed_out = daemon.ctl(&[
        "wait",
        "--for=condition=Ready",
        "vmsnapshot/snap-a",
        "--timeout=1s",
    ]);
    assert_eq!(
        timed_out.failure(),
        "vmsnapctl: timed out waiting for the condition on virtualmachinesnapshots/snap-a"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(10));

    // delete -f, then wait --for=delete returns at once; a second delete is not found.
    let deleted = ctl_stdin(&daemon, &["delete", "-f", "-"], &manifest);
    assert_eq!(
        deleted.ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io \"snap-a\" deleted\n"
    );
    assert!(daemon
        .ctl(&["wait", "--for=delete", "vmsnapshot/snap-a", "--timeout=5s"])
        .ok()
        .contains("snap-a"));
    assert_eq!(
        daemon.ctl(&["delete", "vmsnapshot", "snap-a"]).failure(),
        "vmsnapctl: virtualmachinesnapshots.snapshot.kubevirt.io \"snap-a\" not found"
    );
    assert_eq!(
        daemon
            .ctl(&["delete", "vmsnapshot", "snap-a", "--ignore-not-found"])
            .ok(),
        ""
    );
}

#[test]
fn yaml_everywhere_exit_codes_and_a_closed_pipe() {
    let (_bus, daemon) = daemon();
    // -o yaml on the existing commands: the JSON document's fields.
    let yaml = daemon
        .ctl(&["vm", "show", "test", "-o", "yaml"])
        .ok()
        .to_string();
    assert!(yaml.starts_with("name: test\n"), "{yaml}");
    assert!(yaml.contains("\nstate: running\n"), "{yaml}");
    // -o name is for get only; usage errors exit 2.
    let out = daemon.ctl(&["vm", "list", "-o", "name"]);
    assert!(out.failure().contains("-o name"), "{out:?}");
    let usage = daemon.ctl(&["get"]);
    assert_eq!(usage.code, Some(2), "{usage:?}");
    let usage = daemon.ctl(&["wait", "vmsnapshot/x"]);
    assert_eq!(usage.code, Some(2), "{usage:?}");

    // Standard output is a pipe nobody reads: the output ends quietly, status 141.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(bin("vmsnapctl"))
        .args(["--bus-address", &daemon.bus_address, "vm", "list"])
        .env_remove("VMSNAP_BUS_ADDRESS")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(141), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "");
}

/// What bash's completion asks: the words so far, the index of the word being completed.
fn complete(daemon: &Daemon, words: &[&str]) -> Vec<String> {
    let output = Command::new(bin("vmsnapctl"))
        .arg("--")
        .args(words)
        .env("COMPLETE", "bash")
        .env("_CLAP_COMPLETE_INDEX", (words.len() - 1).to_string())
        .env("_CLAP_IFS", "\n")
        .env("VMSNAP_BUS_ADDRESS", &daemon.bus_address)
        .env_remove("VMSNAP_HOST")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    // Options are offered too for an empty word; the values are what is tested here.
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.starts_with('-'))
        .map(str::to_string)
        .collect()
}

#[test]
fn shell_completion_offers_commands_vm_and_snapshot_names() {
    let (_bus, daemon) = daemon();
    let out = ctl_stdin(
        &daemon,
        &["apply", "-f", "-"],
        &snapshot_manifest("tab-snap", "test"),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    wait_settled(&daemon, "tab-snap");

    assert_eq!(complete(&daemon, &["vmsnapctl", "sn"]), ["snapshot"]);
    assert_eq!(
        complete(&daemon, &["vmsnapctl", "vm", "show", ""]),
        ["test"]
    );
    assert_eq!(
        complete(&daemon, &["vmsnapctl", "snapshot", "show", "te"]),
        ["test"]
    );
    assert_eq!(
        complete(&daemon, &["vmsnapctl", "snapshot", "show", "test", ""]),
        ["tab-snap"]
    );
    assert_eq!(
        complete(&daemon, &["vmsnapctl", "restore", "test", "ta"]),
        ["tab-snap"]
    );
    // vmsnapd unreachable: no candidates, no error in the middle of the command line.
    let output = Command::new(bin("vmsnapctl"))
        .args(["--", "vmsnapctl", "vm", "show", ""])
        .env("COMPLETE", "bash")
        .env("_CLAP_COMPLETE_INDEX", "3")
        .env("VMSNAP_BUS_ADDRESS", "unix:path=/nonexistent/bus.sock")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.lines().all(|l| l.starts_with('-')), "{stdout}");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "");
}

#[test]
fn failure_deadline_is_passed_to_vmsnapd_and_checked_there() {
    let (_bus, daemon) = daemon();
    let with_deadline = |name: &str, deadline: &str| {
        format!(
            "{}  failureDeadline: {deadline}\n",
            snapshot_manifest(name, "test")
        )
    };
    let out = ctl_stdin(
        &daemon,
        &["apply", "-f", "-"],
        &with_deadline("d1", "1m30s"),
    );
    assert_eq!(
        out.ok(),
        "virtualmachinesnapshot.snapshot.kubevirt.io/d1 created\n"
    );
    // One operation per VM: d1 first settles (Failed on the test driver).
    wait_settled(&daemon, "d1");
    // Not longer than freeze_timeout (10s by default): vmsnapd refuses, nothing is created.
    let out = ctl_stdin(&daemon, &["apply", "-f", "-"], &with_deadline("d2", "5s"));
    let message = out.failure();
    assert!(message.contains("freeze_timeout"), "{message}");
    assert!(daemon
        .ctl(&["get", "vmsnapshot", "d2"])
        .failure()
        .contains("not found"));
}

#[test]
fn apply_goes_on_past_an_object_vmsnapd_refuses_as_oc_does() {
    let (_bus, daemon) = daemon();
    let input = format!(
        "{}---\n{}",
        snapshot_manifest("for-nope", "nope"),
        snapshot_manifest("for-test", "test")
    );
    let out = ctl_stdin(&daemon, &["apply", "-f", "-"], &input);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(
        out.stdout,
        "virtualmachinesnapshot.snapshot.kubevirt.io/for-test created\n"
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(
        out.stderr
            .starts_with("vmsnapctl: virtualmachinesnapshot.snapshot.kubevirt.io/for-nope: "),
        "{out:?}"
    );
    assert!(out.stderr.contains("nope"), "{out:?}");
}
