#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::Instant;

use super::*;

// Real output of lvm 2.03.16 in the lab guest (`lvs --reportformat json --units b --nosuffix -o
// LV_FIELDS ...`), captured through guest-exec.
const VG: &str = include_str!("../tests/data/lvs-vg.json");
const TAGGED: &str = include_str!("../tests/data/lvs-tagged.json");
const OVERFLOWED: &str = include_str!("../tests/data/lvs-overflowed.json");
const EMPTY: &str = include_str!("../tests/data/lvs-empty.json");
const THIN_SKIP: &str = include_str!("../tests/data/lvs-thin-skip.json");

fn by_name<'a>(lvs: &'a [LvInfo], name: &str) -> &'a LvInfo {
    lvs.iter().find(|l| l.name == name).unwrap()
}

#[test]
fn parses_a_whole_vg() {
    let lvs = parse_lvs_report(VG).unwrap();
    assert_eq!(lvs.len(), 7);
    let pool = by_name(&lvs, "pool");
    assert_eq!(pool.kind, LvKind::ThinPool);
    assert_eq!(pool.size, 268435456);
    assert_eq!(pool.path, None);
    assert_eq!(pool.fill_percent(), Some(0.0));

    let thin = by_name(&lvs, "thin1");
    assert_eq!(thin.kind, LvKind::Thin);
    assert_eq!(thin.vg, "vg0");
    assert_eq!(thin.size, 64 << 20);
    assert_eq!(thin.pool_lv.as_deref(), Some("pool"));
    assert_eq!(thin.origin, None);
    assert_eq!(thin.tags, ["orig-tag", "vmsnap"]);
    assert_eq!(thin.path.as_deref(), Some("/dev/vg0/thin1"));
    assert!(!thin.is_snapshot() && thin.is_active() && !thin.is_open());
    assert!(!thin.activation_skip());

    let thin_snap = by_name(&lvs, "thin1-snap");
    assert!(thin_snap.is_thin_snapshot() && !thin_snap.is_thick_snapshot());
    assert_eq!(thin_snap.origin.as_deref(), Some("thin1"));
    assert_eq!(thin_snap.tags, ["vmsnap", "vmsnap-vm-abc"]);
    assert!(!thin_snap.is_invalid());

    let thick = by_name(&lvs, "thick1");
    assert_eq!(thick.kind, LvKind::Thick);
    assert!(!thick.is_snapshot());
    assert_eq!(thick.fill_percent(), None);
    assert_eq!(thick.snap_percent, None);

    let s2 = by_name(&lvs, "s2");
    assert_eq!(s2.kind, LvKind::Thick);
    assert!(s2.is_thick_snapshot() && !s2.is_invalid() && !s2.is_merging());
    assert_eq!(s2.size, 8 << 20);
    assert_eq!(s2.fill_percent(), Some(75.39));
    assert_eq!(s2.uuid, "L3VqQy-Ej48-cGNn-wkxS-Ud4Q-Y8vm-903Krw");
}

#[test]
fn parses_tagged_and_empty_reports() {
    let lvs = parse_lvs_report(TAGGED).unwrap();
    let names: Vec<_> = lvs.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["thin1", "thin1-snap"]);
    assert!(parse_lvs_report(EMPTY).unwrap().is_empty());
}

#[test]
fn detects_an_overflowed_thick_snapshot() {
    let lvs = parse_lvs_report(OVERFLOWED).unwrap();
    let s2 = by_name(&lvs, "s2");
    assert_eq!(s2.attr, "swi-I-s---");
    assert!(s2.is_invalid());
    assert_eq!(s2.fill_percent(), Some(100.0));
    assert!(!by_name(&lvs, "thick1").is_invalid());
}

#[test]
fn full_percentages_alone_mark_only_thick_snapshots_invalid() {
    let lvs = parse_lvs_report(VG).unwrap();
    let mut thick = by_name(&lvs, "s2").clone();
    thick.snap_percent = Some(100.0);
    assert!(thick.is_invalid(), "snap_percent 100 before the I state");
    let mut thin = by_name(&lvs, "thin1-snap").clone();
    thin.snap_percent = Some(100.0);
    thin.data_percent = Some(100.0);
    assert!(!thin.is_invalid(), "a fully written thin LV is fine");
}

#[test]
fn inactive_thin_snapshot_with_activation_skip() {
    let lvs = parse_lvs_report(THIN_SKIP).unwrap();
    let t4 = by_name(&lvs, "t4");
    assert!(t4.activation_skip() && !t4.is_active());
    assert_eq!(t4.data_percent, None);
    assert_eq!(by_name(&lvs, "thin1").fill_percent(), Some(12.5));
}

#[test]
fn parses_json_std_numbers_and_rejects_garbage() {
    let std = r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_uuid":"u","lv_size":1048576,
        "lv_attr":"swi-a-s---","segtype":"linear","pool_lv":null,"origin":"o","data_percent":3.5,
        "snap_percent":3.5,"lv_tags":["vmsnap","x"],"lv_path":"/dev/v/a"}]}]}"#;
    let lvs = parse_lvs_report(std).unwrap();
    assert_eq!(lvs[0].size, 1 << 20);
    assert_eq!(lvs[0].snap_percent, Some(3.5));
    assert_eq!(lvs[0].tags, ["vmsnap", "x"]);
    assert_eq!(lvs[0].pool_lv, None);

    assert!(parse_lvs_report("not json").is_err());
    let no_size = r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_size":"","lv_attr":"-wi-a-----"}]}]}"#;
    assert!(parse_lvs_report(no_size).unwrap_err().contains("no size"));
    let short_attr =
        r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_size":"1","lv_attr":"-wi"}]}]}"#;
    assert!(parse_lvs_report(short_attr).is_err());
}

#[test]
fn lv_names_follow_lvm() {
    for ok in [
        "a",
        "vm-100-disk-0",
        "a+b.c-d",
        "_a",
        "xsnapshot",
        "thin1.vmsnap-new",
        &"x".repeat(127),
    ] {
        validate_lv_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    // Each of these was refused by lvm 2.03.16 in the lab guest (see the crate's tests/data).
    for bad in [
        "",
        "-a",
        ".",
        "..",
        "a/b",
        "a b",
        "é",
        "snapshot1",
        "pvmove0",
        "a_tmeta",
        "x_rimage_0",
        "pool_tdata",
        &"x".repeat(128),
    ] {
        let err = validate_lv_name(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad}");
        assert_eq!(err.to_string().lines().count(), 1);
    }
    validate_vg_name("vg0").unwrap();
    validate_vg_name("snapshot").unwrap(); // reserved for LVs only
    assert!(validate_vg_name("-vg").is_err());
    assert!(validate_vg_name("vg/x").is_err());
}

#[test]
fn tags() {
    let tags = vmsnap_tags(
        "0c5d2c2b-8d8b-4a43-9b34-1a9e0e1c0f00",
        "d0b8b4b6-1111-2222-3333-444455556666",
    )
    .unwrap();
    assert_eq!(
        tags,
        [
            "vmsnap",
            "vmsnap-vm-0c5d2c2b-8d8b-4a43-9b34-1a9e0e1c0f00",
            "vmsnap-snap-d0b8b4b6-1111-2222-3333-444455556666"
        ]
    );
    assert!(vmsnap_tags("a b", "c").is_err());
    assert!(validate_tag("-x").is_err());
    assert!(validate_tag("a=b:c/d#e&f!g").is_ok());
    assert!(validate_tag("").is_err());
}

#[test]
fn resolves_device_paths() {
    let r = |p: &str| resolve_device(Path::new(p));
    let pair = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
    assert_eq!(r("/dev/vg0/thin1"), pair("vg0", "thin1"));
    assert_eq!(r("/dev/pve/vm-100-disk-0"), pair("pve", "vm-100-disk-0"));
    assert_eq!(r("/dev/mapper/vg0-thin1"), pair("vg0", "thin1"));
    assert_eq!(
        r("/dev/mapper/pve-vm--100--disk--0"),
        pair("pve", "vm-100-disk-0")
    );
    assert_eq!(r("/dev/mapper/my--vg-my--lv"), pair("my-vg", "my-lv"));
    assert_eq!(r("/dev/mapper/vg----x-lv"), pair("vg--x", "lv"));
    assert_eq!(r("/dev/mapper/vg0-thin1--snap"), pair("vg0", "thin1-snap"));
    // A VG name may end in '-': "vg-" + "x" is "vg---x".
    assert_eq!(r("/dev/mapper/vg---x"), pair("vg-", "x"));
    for none in [
        "/dev/mapper/vg0-pool-tpool",
        "/dev/mapper/vg0-thick1-real",
        "/dev/mapper/control",
        "/dev/mapper/vg0-",
        "/dev/vda",
        "/dev/disk/by-id/x",
        "/dev/input/event0",
        "/dev/vg0/thin1/x",
        "/var/lib/libvirt/images/a.qcow2",
        "dev/vg0/lv",
        "/dev/vg0/pool_tmeta",
        "/dev/vg0/a b",
    ] {
        assert_eq!(r(none), None, "{none}");
    }
}

#[test]
fn thick_snapshot_sizes() {
    const MIB: u64 = 1 << 20;
    assert_eq!(thick_snapshot_size(1000 * MIB, 20.0, 64 * MIB), 200 * MIB);
    assert_eq!(thick_snapshot_size(100 * MIB, 20.0, 64 * MIB), 64 * MIB);
    assert_eq!(thick_snapshot_size(1001, 10.0, 0), 512); // 100.1 -> 101 -> one sector
    assert_eq!(thick_snapshot_size(0, 20.0, 0), 0);
    assert_eq!(thick_snapshot_size(10 * MIB, f64::NAN, 4 * MIB), 4 * MIB);
    assert_eq!(thick_snapshot_size(10 * MIB, -5.0, 4 * MIB), 4 * MIB);
    assert_eq!(thick_snapshot_size(10 * MIB, 100.0, 0), 10 * MIB);
    assert!(thick_snapshot_size(u64::MAX, 200.0, 0) >= u64::MAX - 511);
    assert_eq!(thick_snapshot_size(u64::MAX / 2, 1.0, 0) % 512, 0);
}

#[test]
fn restore_names_fit() {
    let (new, old) = restore_names("vm-100-disk-0").unwrap();
    assert_eq!(new, "vm-100-disk-0.vmsnap-new");
    assert_eq!(old, "vm-100-disk-0.vmsnap-old");
    assert!(restore_names(&"x".repeat(120)).is_err());
}

#[test]
fn one_line_lvm_messages() {
    let stderr = "  Names starting \"snapshot\" are reserved. Please choose a different LV name.\n  Run `lvcreate --help' for more information.\n";
    assert_eq!(
        lvm_message(stderr),
        "Names starting \"snapshot\" are reserved. Please choose a different LV name."
    );
    let two = "  Volume group \"nosuchvg\" not found\n  Cannot process volume group nosuchvg\n";
    assert_eq!(
        lvm_message(two),
        "Volume group \"nosuchvg\" not found; Cannot process volume group nosuchvg"
    );
    let warn =
        "  WARNING: Sum of all thin volume sizes exceeds the pool.\n  Insufficient free space\n";
    assert_eq!(lvm_message(warn), "Insufficient free space");
    assert_eq!(lvm_message("  WARNING: only this\n"), "WARNING: only this");
    let repeated = "  Can't open /dev/vdb exclusively.\n  Error opening device\n  Can't open /dev/vdb exclusively.\n";
    assert_eq!(
        lvm_message(repeated),
        "Can't open /dev/vdb exclusively.; Error opening device"
    );
}

/// A fake `lvm` that logs its arguments (one per line, then `--`) and answers from files.
struct FakeLvm {
    dir: std::path::PathBuf,
    lvm: Lvm,
}

impl FakeLvm {
    fn new(name: &str, script_body: &str) -> FakeLvm {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmsnap-lvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("lvm");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done >> {log}\necho -- >> {log}\n{script_body}\n",
                log = dir.join("log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeLvm {
            lvm: Lvm::with_program(&script),
            dir,
        }
    }

    fn calls(&self) -> Vec<Vec<String>> {
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        log.split("--\n")
            .filter(|c| !c.is_empty())
            .map(|c| c.lines().map(str::to_string).collect())
            .collect()
    }
}

impl Drop for FakeLvm {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn commands_carry_lvm_messages_and_no_shell() {
    let fake = FakeLvm::new(
        "msg",
        "echo '  Logical Volume \"thin1\" already exists in volume group \"vg0\"' >&2\necho \"  Run \\`lvcreate --help' for more information.\" >&2\nexit 5",
    );
    let err = fake
        .lvm
        .run("lvcreate", ["-n", "x; rm -rf /", "$(id)"])
        .unwrap_err();
    match &err {
        Error::Command {
            command,
            status,
            message,
        } => {
            assert_eq!(command, "lvcreate");
            assert_eq!(*status, Some(5));
            assert_eq!(
                message,
                "Logical Volume \"thin1\" already exists in volume group \"vg0\""
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.to_string().lines().count(), 1);
    assert_eq!(fake.calls(), [["lvcreate", "-n", "x; rm -rf /", "$(id)"]]);
}

#[test]
fn missing_program_and_missing_lv() {
    let err = Lvm::with_program("/nonexistent/lvm")
        .run("lvs", ["x"])
        .unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err:?}");

    let fake = FakeLvm::new("find", &format!("cat <<'EOF'\n{VG}\nEOF"));
    assert!(fake.lvm.find_lv("vg0", "nope").unwrap().is_none());
    let err = fake.lvm.lv("vg0", "nope").unwrap_err();
    assert_eq!(err.to_string(), "logical volume vg0/nope not found");
    assert_eq!(fake.lvm.lv("vg0", "thin1").unwrap().size, 64 << 20);
    assert_eq!(fake.lvm.fill_percent("vg0", "s2").unwrap(), Some(75.39));
    let calls = fake.calls();
    assert_eq!(
        calls[0],
        [
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            LV_FIELDS,
            "vg0"
        ]
    );
    // Invalid names never reach LVM.
    assert!(matches!(
        fake.lvm.lv("vg0", "-rf"),
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        fake.lvm.lvs_tagged("a b"),
        Err(Error::InvalidName { .. })
    ));
    assert_eq!(fake.calls().len(), calls.len());
}

#[test]
fn snapshot_command_lines() {
    // lvs answers the VG sample; lvcreate succeeds silently.
    let fake = FakeLvm::new(
        "snap",
        &format!("if [ \"$1\" = lvs ]; then cat <<'EOF'\n{VG}\nEOF\nfi"),
    );
    let tags = vmsnap_tags("vm", "sn").unwrap();
    // The fake VG has no LV named "new", so the final lookup fails; the command line is what
    // is checked here.
    let _ = fake.lvm.snapshot_thin("vg0", "thin1", "new", &tags);
    let _ = fake.lvm.snapshot_thick("vg0", "thick1", "new", 1000, &tags);
    assert!(matches!(
        fake.lvm.snapshot_thin("vg0", "thick1", "new", &tags),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        fake.lvm
            .snapshot_thick("vg0", "thin1", "new", 1 << 20, &tags),
        Err(Error::InvalidState(_))
    ));
    let creates: Vec<Vec<String>> = fake
        .calls()
        .into_iter()
        .filter(|c| c[0] == "lvcreate")
        .collect();
    assert_eq!(
        creates,
        [
            vec![
                "lvcreate",
                "-s",
                "vg0/thin1",
                "-n",
                "new",
                "-kn",
                "-ay",
                "--addtag",
                "vmsnap",
                "--addtag",
                "vmsnap-vm-vm",
                "--addtag",
                "vmsnap-snap-sn"
            ],
            vec![
                "lvcreate",
                "-s",
                "vg0/thick1",
                "-n",
                "new",
                "-L",
                "1024b",
                "--addtag",
                "vmsnap",
                "--addtag",
                "vmsnap-vm-vm",
                "--addtag",
                "vmsnap-snap-sn"
            ]
        ]
    );
}

#[test]
fn timeout_defaults_and_builder() {
    assert_eq!(Lvm::new().timeout(), DEFAULT_TIMEOUT);
    assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(600));
    assert_eq!(Lvm::with_program("/x/lvm").timeout(), DEFAULT_TIMEOUT);
    let lvm = Lvm::with_program("/x/lvm").with_timeout(Duration::from_secs(5));
    assert_eq!(lvm.timeout(), Duration::from_secs(5));
    assert_eq!(lvm.program, Path::new("/x/lvm"));

    let err = Error::Timeout {
        command: "lvconvert".into(),
        after: DEFAULT_TIMEOUT,
    };
    assert_eq!(
        err.to_string(),
        "lvm lvconvert did not finish within 10m; it was stopped (LVM commits its metadata \
         atomically: the change was made completely or not at all; a merge that started \
         continues in the kernel)"
    );
    for (d, s) in [
        (Duration::from_secs(3600), "1h"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_secs(120), "2m"),
        (Duration::from_millis(200), "200ms"),
        (Duration::from_millis(1500), "1.5s"),
        (Duration::ZERO, "0ns"),
    ] {
        assert_eq!(format_duration(d), s);
    }
}

/// Whether process `pid` exists (a zombie, not yet reaped, still does).
fn process_exists(pid: &str) -> bool {
    Path::new("/proc").join(pid.trim()).exists()
}

#[test]
fn a_command_past_its_timeout_is_killed_and_reaped() {
    let fake = FakeLvm::new(
        "timeout",
        "echo $$ > \"$(dirname \"$0\")/pid\"\nexec sleep 30",
    );
    let lvm = fake.lvm.clone().with_timeout(Duration::from_millis(500));
    let start = Instant::now();
    let err = lvm.run("lvconvert", ["--merge", "vg0/s"]).unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "{took:?}"
    );
    match &err {
        Error::Timeout { command, after } => {
            assert_eq!(command, "lvconvert");
            assert_eq!(*after, Duration::from_millis(500));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.to_string().lines().count(), 1);
    assert!(err
        .to_string()
        .starts_with("lvm lvconvert did not finish within 500ms; it was stopped (LVM commits"));
    let pid = std::fs::read_to_string(fake.dir.join("pid")).unwrap();
    assert!(!process_exists(&pid), "lvm (pid {pid}) is still there");
}

#[test]
fn a_leftover_child_holding_the_pipes_does_not_hold_up_the_caller() {
    // The killed script's `sleep` keeps the output pipes open.
    let fake = FakeLvm::new(
        "timeout-child",
        "echo $$ > \"$(dirname \"$0\")/pid\"\nsleep 3",
    );
    let lvm = fake.lvm.clone().with_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = lvm.run("lvs", ["vg0"]).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let pid = std::fs::read_to_string(fake.dir.join("pid")).unwrap();
    assert!(!process_exists(&pid), "lvm (pid {pid}) is still there");

    // lvm exits but leaves a process holding its standard output: its status and the output
    // so far count once the timeout has passed.
    let fake = FakeLvm::new("leftover", "echo out\nsleep 3 &\nexit 0");
    let lvm = fake.lvm.clone().with_timeout(Duration::from_millis(300));
    let start = Instant::now();
    assert_eq!(lvm.run("lvs", ["vg0"]).unwrap(), "out\n");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn chatty_commands_do_not_deadlock() {
    // Well over a pipe's buffer (64 KiB) on both outputs, then a failure.
    let fake = FakeLvm::new(
        "chatty",
        "seq 1 200000\nseq 1 200000 >&2\nyes '  chatter' | head -n 100000 >&2\n\
         echo '  Insufficient free space' >&2\nexit 5",
    );
    let lvm = fake.lvm.clone().with_timeout(Duration::from_secs(60));
    let start = Instant::now();
    let err = lvm.run("lvcreate", ["-n", "x"]).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    match &err {
        Error::Command {
            command,
            status,
            message,
        } => {
            assert_eq!(command, "lvcreate");
            assert_eq!(*status, Some(5));
            assert!(message.len() > 1 << 20, "{}", message.len());
            assert!(message.starts_with("1; 2; 3; "), "{}", &message[..20]);
            assert!(
                message.ends_with("; 200000; chatter; Insufficient free space"),
                "{}",
                &message[message.len() - 60..]
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.to_string().lines().count(), 1);

    // The same output with success: all of standard output comes back.
    let fake = FakeLvm::new("chatty-ok", "seq 1 200000\nseq 1 200000 >&2");
    let out = fake.lvm.run("lvs", ["vg0"]).unwrap();
    assert!(out.len() > 1 << 20);
    assert_eq!(out.lines().count(), 200000);
    assert!(out.ends_with("199999\n200000\n"));
}

#[test]
fn quick_commands_succeed_within_a_short_timeout() {
    let fake = FakeLvm::new("quick", &format!("cat <<'EOF'\n{VG}\nEOF"));
    let lvm = fake.lvm.clone().with_timeout(Duration::from_secs(5));
    assert_eq!(lvm.lv("vg0", "thin1").unwrap().size, 64 << 20);
    let start = Instant::now();
    assert_eq!(lvm.run("lvs", ["vg0"]).unwrap().trim(), VG.trim());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // A failure that prints nothing.
    let fake = FakeLvm::new("silent", "exit 3");
    let err = fake.lvm.run("lvs", ["vg0"]).unwrap_err();
    assert_eq!(err.to_string(), "lvm lvs failed: exit status 3");
}

mod fuzz {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};

    use crate::parse_lvs_report;

    const REPORT: &str = r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_uuid":"u",
        "lv_size":"1048576B","lv_attr":"Vwi-a-tz--","segtype":"thin","pool_lv":"pool",
        "origin":"","data_percent":"12.50","snap_percent":"","lv_tags":"vmsnap,vmsnap-vm-x",
        "lv_path":"/dev/v/a"},{"lv_name":"s","vg_name":"v","lv_size":1048576,
        "lv_attr":"swi-a-s---","origin":"a","snap_percent":3.5,"lv_tags":["vmsnap"]}]}]}"#;
    const TOKENS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "null",
        "-1",
        "1e999",
        "\"\"",
        "\"lv_attr\":\"-\"",
        "18446744073709551616B",
        "NaN",
        "\u{0}",
        "..",
        "/",
    ];

    proptest! {
        #![proptest_config(Config {
            cases: 3000,
            failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
            // The same cases on every run, as in the daemon's fuzz targets.
            rng_seed: RngSeed::Fixed(0x766d_736e_6170),
            ..Config::default()
        })]

        /// `lvs --reportformat json` output, mutated: parsed or refused, never a panic, also
        /// when what was accepted is used.
        #[test]
        fn fuzz_lvs_report(
            edits in prop::collection::vec((any::<u16>(), 0u8..5, any::<u8>()), 0..8)
        ) {
            let mut bytes = REPORT.as_bytes().to_vec();
            for (position, op, value) in edits {
                let at = usize::from(position) % (bytes.len() + 1);
                match op {
                    0 => bytes.insert(at, value),
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    2 if at < bytes.len() => bytes[at] = value,
                    3 => {
                        let token = TOKENS[usize::from(value) % TOKENS.len()].as_bytes();
                        bytes.splice(at..at, token.iter().copied());
                    }
                    _ => bytes.truncate(at.max(bytes.len() / 2)),
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(lvs) = parse_lvs_report(&text) {
                for lv in lvs {
                    let _ = lv.fill_percent();
                }
            }
        }
    }

    #[test]
    fn seed_is_accepted() {
        assert_eq!(parse_lvs_report(REPORT).map(|l| l.len()), Ok(2));
    }
}
