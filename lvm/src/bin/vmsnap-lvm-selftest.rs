//! Exercises every operation of vmsnap-lvm against real LVM, on a scratch disk it takes over:
//!
//! ```text
//! vmsnap-lvm-selftest DEVICE     # e.g. /dev/vdb in the lab's LVM guest; DESTROYS ITS CONTENT
//! ```
//!
//! Creates VG `vmsnaptest` on DEVICE (removing an earlier one) with a thin pool, thin LVs of 64
//! MiB and 1 GiB and a 64 MiB thick LV, then snapshots, overwrites, restores (also after
//! simulated crashes at every step), deletes and overflows, comparing SHA-256 checksums of the
//! LVs' first 8 MiB (`sha256sum`, after dropping the page cache). Prints one line per result:
//! `CHECK <name> ok`, `CHECK <name> FAIL <detail>`, `TIME <name> <ms> ms`, `INFO ...`, and ends
//! with `SELFTEST PASS` (exit 0) or `SELFTEST FAIL` (exit 1). Linux only; needs root.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use vmsnap_lvm::{
    resolve_device, thick_snapshot_size, vmsnap_tags, Error, Lvm, ThickRecovery, ThickRestoreStep,
    ThinRecovery, ThinRestoreStep,
};

const VG: &str = "vmsnaptest";
const MIB: u64 = 1 << 20;
/// Bytes written and checksummed at the start of each LV.
const DATA: usize = 8 << 20;

type Res<T> = Result<T, String>;

struct Run {
    lvm: Lvm,
    failures: usize,
}

impl Run {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            println!("CHECK {name} ok");
        } else {
            self.failures += 1;
            println!("CHECK {name} FAIL {detail}");
        }
    }

    fn timed<T>(&self, name: &str, f: impl FnOnce() -> Result<T, Error>) -> Res<T> {
        let start = Instant::now();
        let value = f().map_err(|e| format!("{name}: {e}"))?;
        println!("TIME {name} {} ms", start.elapsed().as_millis());
        Ok(value)
    }

    fn lvm(&self, sub: &str, args: &[&str]) -> Res<String> {
        self.lvm
            .run(sub, args)
            .map_err(|e| format!("lvm {sub} {args:?}: {e}"))
    }
}

fn dev(lv: &str) -> String {
    format!("/dev/{VG}/{lv}")
}

/// Writes DATA bytes of a pattern derived from `seed` at the start of the LV and syncs.
fn write_pattern(lv: &str, seed: u64) -> Res<()> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; DATA];
    for chunk in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(dev(lv))
        .map_err(|e| format!("open {}: {e}", dev(lv)))?;
    file.write_all(&buf)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("write {}: {e}", dev(lv)))
}

/// SHA-256 of the LV's first DATA bytes, read after dropping the page cache.
fn checksum(lv: &str) -> Res<String> {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let data = {
        use std::io::Read;
        let mut buf = vec![0u8; DATA];
        std::fs::File::open(dev(lv))
            .and_then(|mut f| f.read_exact(&mut buf))
            .map_err(|e| format!("read {}: {e}", dev(lv)))?;
        buf
    };
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("sha256sum: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("sha256sum: no stdin")?
        .write_all(&data)
        .map_err(|e| format!("sha256sum: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "sha256sum printed nothing".to_string())
}

/// LVM reports tags sorted.
fn same_tags(have: &[String], want: &[String]) -> bool {
    let mut have = have.to_vec();
    let mut want = want.to_vec();
    have.sort();
    want.sort();
    have == want
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn setup(run: &Run, device: &str) -> Res<()> {
    // Leftovers of an earlier run on the same disk.
    let _ = run.lvm.run("vgremove", ["-ff", "-y", VG]);
    run.lvm("pvcreate", &["-ff", "-y", device])?;
    run.lvm("vgcreate", &[VG, device])?;
    run.lvm("lvcreate", &["-L", "384m", "-T", &format!("{VG}/pool")])?;
    run.lvm(
        "lvcreate",
        &["-V", "64m", "-T", &format!("{VG}/pool"), "-n", "disk-small"],
    )?;
    run.lvm(
        "lvcreate",
        &["-V", "1g", "-T", &format!("{VG}/pool"), "-n", "disk-big"],
    )?;
    run.lvm("lvcreate", &["-L", "64m", "-n", "disk-thick", VG])?;
    Ok(())
}

fn thin_cycle(run: &mut Run, origin: &str, label: &str, tags: &[String]) -> Res<()> {
    let snap = format!("{origin}.snap1");
    write_pattern(origin, 1)?;
    let before = checksum(origin)?;
    let info = run.timed(&format!("snapshot_thin_{label}"), || {
        run.lvm.snapshot_thin(VG, origin, &snap, tags)
    })?;
    run.check(
        &format!("thin_{label}_snapshot_active_tagged"),
        info.is_active() && info.is_thin_snapshot() && same_tags(&info.tags, tags),
        format!("{info:?}"),
    );
    write_pattern(origin, 2)?;
    let after = checksum(origin)?;
    let in_snap = checksum(&snap)?;
    run.check(
        &format!("thin_{label}_snapshot_keeps_data"),
        in_snap == before && after != before,
        format!(
            "before {} after {} snapshot {}",
            short(&before),
            short(&after),
            short(&in_snap)
        ),
    );
    run.timed(&format!("restore_thin_{label}"), || {
        run.lvm.restore_thin(VG, origin, &snap)
    })?;
    let restored = checksum(origin)?;
    let kept = checksum(&snap)?;
    run.check(
        &format!("thin_{label}_restore_brings_data_back"),
        restored == before && kept == before,
        format!(
            "origin {} snapshot {} expected {}",
            short(&restored),
            short(&kept),
            short(&before)
        ),
    );
    let origin_info = run.lvm.lv(VG, origin).map_err(|e| e.to_string())?;
    run.check(
        &format!("thin_{label}_restored_origin_clean"),
        origin_info.is_active()
            && origin_info.origin.as_deref() == Some(snap.as_str())
            && origin_info.tags.is_empty()
            && run.lvm.find_lv(VG, &format!("{origin}.vmsnap-old")).ok() == Some(None)
            && run.lvm.find_lv(VG, &format!("{origin}.vmsnap-new")).ok() == Some(None),
        format!("{origin_info:?}"),
    );
    println!(
        "INFO {label}: {origin} {} data {:?}% pool {}",
        origin_info.size,
        origin_info.data_percent,
        origin_info.pool_lv.as_deref().unwrap_or("-")
    );
    Ok(())
}

fn thin_crashes(run: &mut Run, tags: &[String]) -> Res<()> {
    let origin = "disk-small";
    let snap = "disk-small.snap1";
    let good = checksum(snap)?;
    let steps = [
        (ThinRestoreStep::CreateNew, ThinRecovery::Nothing),
        (ThinRestoreStep::RenameOriginToOld, ThinRecovery::RolledBack),
        (
            ThinRestoreStep::RenameNewToOrigin,
            ThinRecovery::RolledForward,
        ),
        (ThinRestoreStep::RemoveOld, ThinRecovery::RolledForward),
        (ThinRestoreStep::Untag, ThinRecovery::RolledForward),
    ];
    for (seed, (stop, expected)) in (10u64..).zip(steps) {
        write_pattern(origin, seed)?;
        let current = checksum(origin)?;
        let result = run.lvm.restore_thin_with(VG, origin, snap, |s| {
            if s == stop {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        let stopped = matches!(result, Err(Error::Stopped { .. }));
        let names: Vec<String> = run
            .lvm
            .lvs_tagged("vmsnap-restore-new")
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|l| l.name)
            .collect();
        println!(
            "INFO crash before {}: LVs tagged vmsnap-restore-new {names:?}",
            stop.name()
        );
        let outcome = run.timed(&format!("recover_thin_before_{}", stop.name()), || {
            run.lvm.recover_thin_restore(VG, origin)
        })?;
        let again = run
            .lvm
            .recover_thin_restore(VG, origin)
            .map_err(|e| e.to_string())?;
        let now = checksum(origin)?;
        let want = if expected == ThinRecovery::RolledForward {
            &good
        } else {
            &current
        };
        run.check(
            &format!("thin_crash_before_{}", stop.name()),
            stopped && outcome == expected && again == ThinRecovery::Nothing && &now == want,
            format!(
                "result {result:?} outcome {outcome:?} again {again:?} origin {} want {}",
                short(&now),
                short(want)
            ),
        );
    }
    // Recovery refuses a state no restore leaves (a foreign LV with the new name).
    run.lvm(
        "lvcreate",
        &[
            "-V",
            "4m",
            "-T",
            &format!("{VG}/pool"),
            "-n",
            "disk-small.vmsnap-new",
        ],
    )?;
    let refused = run.lvm.recover_thin_restore(VG, origin);
    run.check(
        "thin_recovery_refuses_foreign_lv",
        matches!(refused, Err(Error::InvalidState(_))),
        format!("{refused:?}"),
    );
    let refused = run.lvm.restore_thin(VG, origin, snap);
    run.check(
        "thin_restore_refuses_leftovers",
        matches!(&refused, Err(Error::InvalidState(m)) if m.contains("recover first")),
        format!("{refused:?}"),
    );
    run.lvm
        .remove(VG, "disk-small.vmsnap-new")
        .map_err(|e| e.to_string())?;
    let _ = tags;
    Ok(())
}

fn thick_cycle(run: &mut Run, tags: &[String]) -> Res<()> {
    let origin = "disk-thick";
    let snap = "disk-thick.snap1";
    write_pattern(origin, 1)?;
    let before = checksum(origin)?;
    let size = thick_snapshot_size(64 * MIB, 20.0, 16 * MIB);
    let info = run.timed("snapshot_thick_64MiB", || {
        run.lvm.snapshot_thick(VG, origin, snap, size, tags)
    })?;
    run.check(
        "thick_snapshot_created",
        info.is_thick_snapshot()
            && info.size == size
            && same_tags(&info.tags, tags)
            && !info.is_invalid(),
        format!("{info:?}"),
    );
    write_pattern(origin, 2)?;
    let in_snap = checksum(snap)?;
    let after = checksum(origin)?;
    run.check(
        "thick_snapshot_keeps_data",
        in_snap == before && after != before,
        format!(
            "before {} after {} snapshot {}",
            short(&before),
            short(&after),
            short(&in_snap)
        ),
    );
    let fill = run.lvm.fill_percent(VG, snap).map_err(|e| e.to_string())?;
    run.check(
        "thick_fill_percent",
        fill.is_some_and(|f| f > 40.0 && f < 100.0),
        format!("{fill:?}"),
    );
    println!("INFO thick fill after 8 MiB changed: {fill:?}%");
    let retaken = run.timed("restore_thick_64MiB_8MiB_changed", || {
        run.lvm.restore_thick(VG, origin, snap)
    })?;
    let restored = checksum(origin)?;
    let again = checksum(snap)?;
    run.check(
        "thick_restore_brings_data_back",
        restored == before && again == before,
        format!(
            "origin {} snapshot {} expected {}",
            short(&restored),
            short(&again),
            short(&before)
        ),
    );
    run.check(
        "thick_snapshot_retaken",
        same_tags(&retaken.tags, tags)
            && retaken.size == size
            && retaken.uuid != info.uuid
            && retaken.fill_percent().is_some_and(|f| f < 1.0),
        format!("{retaken:?}"),
    );

    // Crash between merge and re-take.
    write_pattern(origin, 3)?;
    let result = run.lvm.restore_thick_with(VG, origin, snap, |s| {
        if s == ThickRestoreStep::Retake {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    let gone = run
        .lvm
        .find_lv(VG, snap)
        .map_err(|e| e.to_string())?
        .is_none();
    let outcome = run
        .lvm
        .recover_thick_restore(VG, origin, snap, size, tags)
        .map_err(|e| e.to_string())?;
    let again = run
        .lvm
        .recover_thick_restore(VG, origin, snap, size, tags)
        .map_err(|e| e.to_string())?;
    let restored = checksum(origin)?;
    run.check(
        "thick_crash_before_retake",
        matches!(result, Err(Error::Stopped { .. }))
            && gone
            && outcome == ThickRecovery::Retaken
            && again == ThickRecovery::Nothing
            && restored == before
            && checksum(snap)? == before,
        format!("result {result:?} gone {gone} outcome {outcome:?} again {again:?}"),
    );
    Ok(())
}

fn overflow(run: &mut Run, tags: &[String]) -> Res<()> {
    let origin = "disk-thick";
    let small = "disk-thick.small";
    run.lvm
        .snapshot_thick(VG, origin, small, 4 * MIB, tags)
        .map_err(|e| e.to_string())?;
    write_pattern(origin, 7)?; // 8 MiB of changes into 4 MiB of copy-on-write space
    let info = run.lvm.lv(VG, small).map_err(|e| e.to_string())?;
    println!(
        "INFO overflowed snapshot attr {} snap_percent {:?}",
        info.attr, info.snap_percent
    );
    run.check(
        "thick_overflow_detected_invalid",
        info.is_invalid() && info.fill_percent() == Some(100.0) && info.attr.get(4..5) == Some("I"),
        format!("{info:?}"),
    );
    let refused = run.lvm.restore_thick(VG, origin, small);
    run.check(
        "thick_restore_refuses_invalid",
        matches!(refused, Err(Error::InvalidSnapshot { .. })),
        format!("{refused:?}"),
    );
    if let Err(e) = &refused {
        println!("INFO refusal: {e}");
    }
    let other = run
        .lvm
        .lv(VG, "disk-thick.snap1")
        .map_err(|e| e.to_string())?;
    run.check(
        "thick_other_snapshot_still_valid",
        !other.is_invalid(),
        format!("{other:?}"),
    );
    run.lvm.remove(VG, small).map_err(|e| e.to_string())?;
    Ok(())
}

fn delete(run: &mut Run) -> Res<()> {
    let before: Vec<String> = run
        .lvm
        .run("lvs", ["--noheadings", "-o", "lv_name", VG])
        .map_err(|e| e.to_string())?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let origin_sum = checksum("disk-small")?;
    run.timed("remove_thin_snapshot", || {
        run.lvm.remove(VG, "disk-small.snap1")
    })?;
    run.timed("remove_thick_snapshot", || {
        run.lvm.remove(VG, "disk-thick.snap1")
    })?;
    let after: Vec<String> = run
        .lvm
        .run("lvs", ["--noheadings", "-o", "lv_name", VG])
        .map_err(|e| e.to_string())?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let expected: Vec<String> = before
        .iter()
        .filter(|n| *n != "disk-small.snap1" && *n != "disk-thick.snap1")
        .cloned()
        .collect();
    run.check(
        "delete_removes_only_the_snapshot",
        after == expected && checksum("disk-small")? == origin_sum,
        format!("before {before:?} after {after:?}"),
    );
    Ok(())
}

fn errors_and_paths(run: &mut Run, tags: &[String]) -> Res<()> {
    let dup = run
        .lvm
        .snapshot_thin(VG, "disk-big", "disk-big.snap1", tags);
    let message = match &dup {
        Err(Error::Command { message, .. }) => message.clone(),
        other => format!("{other:?}"),
    };
    println!(
        "INFO duplicate name: {}",
        dup.as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    run.check(
        "lvm_error_message_one_line",
        message.contains("already exists") && !message.contains('\n'),
        &message,
    );
    let missing = run.lvm.lv(VG, "nope");
    run.check(
        "missing_lv_not_found",
        matches!(missing, Err(Error::NotFound { .. })),
        format!("{missing:?}"),
    );
    let missing_vg = run.lvm.lv("novg", "nope");
    println!(
        "INFO missing VG: {}",
        missing_vg
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    run.check(
        "missing_vg_is_lvm_error",
        matches!(&missing_vg, Err(Error::Command { message, .. }) if message.contains("not found")),
        format!("{missing_vg:?}"),
    );
    let reserved = run.lvm.snapshot_thin(VG, "disk-big", "snapshot-1", tags);
    run.check(
        "reserved_name_refused_before_lvm",
        matches!(reserved, Err(Error::InvalidName { .. })),
        format!("{reserved:?}"),
    );
    let tagged = run.lvm.lvs_tagged("vmsnap").map_err(|e| e.to_string())?;
    let names: Vec<&str> = tagged.iter().map(|l| l.name.as_str()).collect();
    run.check(
        "lvs_tagged_lists_snapshots",
        names.contains(&"disk-big.snap1")
            && names.contains(&"disk-small.snap1")
            && names.contains(&"disk-thick.snap1")
            && !names.contains(&"disk-big"),
        format!("{names:?}"),
    );
    for path in [
        format!("/dev/{VG}/disk-big.snap1"),
        format!("/dev/mapper/{VG}-disk--big.snap1"),
    ] {
        let resolved = resolve_device(Path::new(&path));
        let found = resolved
            .as_ref()
            .and_then(|(vg, lv)| run.lvm.find_lv(vg, lv).ok().flatten());
        run.check(
            &format!("resolve_device {path}"),
            Path::new(&path).exists() && found.is_some_and(|l| l.name == "disk-big.snap1"),
            format!("{resolved:?}"),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(device) = args.get(1) else {
        eprintln!("usage: vmsnap-lvm-selftest DEVICE   (destroys DEVICE's content)");
        return ExitCode::from(2);
    };
    let mut run = Run {
        lvm: Lvm::new(),
        failures: 0,
    };
    let result = (|| -> Res<()> {
        let start = Instant::now();
        setup(&run, device)?;
        println!("TIME setup_vg_pool_lvs {} ms", start.elapsed().as_millis());
        let tags = vmsnap_tags(
            "11111111-2222-3333-4444-555555555555",
            "66666666-7777-8888-9999-000000000000",
        )
        .map_err(|e| e.to_string())?;
        thin_cycle(&mut run, "disk-small", "64MiB", &tags)?;
        thin_cycle(&mut run, "disk-big", "1GiB", &tags)?;
        thin_crashes(&mut run, &tags)?;
        thick_cycle(&mut run, &tags)?;
        errors_and_paths(&mut run, &tags)?;
        overflow(&mut run, &tags)?;
        delete(&mut run)?;
        Ok(())
    })();
    if let Err(e) = result {
        run.failures += 1;
        println!("ERROR {e}");
    }
    if run.failures == 0 {
        println!("SELFTEST PASS");
        ExitCode::SUCCESS
    } else {
        println!("SELFTEST FAIL ({} failures)", run.failures);
        ExitCode::FAILURE
    }
}
