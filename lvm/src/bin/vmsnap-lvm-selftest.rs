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
//!
//! ```text
//! vmsnap-lvm-selftest --bench N DEVICE   # benchmark (bench/lvm.sh); also DESTROYS DEVICE's content
//! ```
//!
//! Times N rounds of snapshot, restore and delete of thin LVs of 64 MiB and 4 GiB and a thick LV
//! of 256 MiB (VG `vmsnapbench`) and prints a markdown table; see the `bench` module.

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
    if args.get(1).map(String::as_str) == Some("--bench") {
        return bench::main(&args[2..]);
    }
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

/// `--bench N DEVICE`: N rounds, on VG `vmsnapbench` made on DEVICE, of snapshot, overwrite,
/// restore and delete of the snapshot for a thin LV of 64 MiB, a thin LV of 4 GiB (both virtual
/// size, in one thin pool) and a thick LV of 256 MiB. Each LV first gets 32 MiB of data (8 chunks
/// of 4 MiB, chunk k at k/8 of the LV); each round overwrites 8 MiB of it (chunks 0 and 4) after
/// the snapshot, and then does the thick LV once more overwriting all 32 MiB (a thick restore
/// merges the changed data back, so its cost follows the amount changed). Each round also times
/// one `lvs` report of one LV, the cost of a single LVM command, as a baseline. Only the vmsnap-lvm calls are timed (`Instant`, around `snapshot_thin` /
/// `snapshot_thick`, `restore_thin` / `restore_thick`, `remove`); after every restore the first
/// chunk is read back (page cache dropped) and compared with the data written before the
/// snapshot, so a restore that did nothing fails the bench. Prints `ROUND` lines (raw times),
/// `INFO` lines, a markdown table (median/min/max ms) and `RATIO` of the 4 GiB thin restore's
/// median to the 64 MiB one's; ends with `BENCH PASS` (exit 0) or `BENCH FAIL` (exit 1).
mod bench {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::process::ExitCode;
    use std::time::Instant;

    use vmsnap_lvm::{thick_snapshot_size, vmsnap_tags, Lvm};

    const VG: &str = "vmsnapbench";
    const MIB: u64 = 1 << 20;
    const CHUNK: usize = 4 << 20;
    const CHUNKS: u64 = 8;
    /// Chunks overwritten after each snapshot (8 MiB), or all of them (32 MiB).
    const OVERWRITE: &[u64] = &[0, 4];
    const OVERWRITE_ALL: &[u64] = &[0, 1, 2, 3, 4, 5, 6, 7];

    type Res<T> = Result<T, String>;

    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Thin,
        Thick,
    }

    struct Target {
        lv: &'static str,
        label: &'static str,
        overwrite: &'static [u64],
        size: u64,
        kind: Kind,
    }

    const TARGETS: [Target; 4] = [
        Target {
            lv: "thin-small",
            label: "thin 64 MiB",
            size: 64 * MIB,
            kind: Kind::Thin,
            overwrite: OVERWRITE,
        },
        Target {
            lv: "thin-big",
            label: "thin 4 GiB",
            size: 4096 * MIB,
            kind: Kind::Thin,
            overwrite: OVERWRITE,
        },
        Target {
            lv: "thick",
            label: "thick 256 MiB",
            size: 256 * MIB,
            kind: Kind::Thick,
            overwrite: OVERWRITE,
        },
        // The same thick LV again, with 32 MiB changed: a merge copies the changed data back.
        Target {
            lv: "thick",
            label: "thick 256 MiB, 32 MiB changed",
            size: 256 * MIB,
            kind: Kind::Thick,
            overwrite: OVERWRITE_ALL,
        },
    ];
    const OPS: [&str; 3] = ["snapshot", "restore", "delete"];

    fn dev(lv: &str) -> String {
        format!("/dev/{VG}/{lv}")
    }

    fn pattern(seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut buf = vec![0u8; CHUNK];
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        buf
    }

    /// Writes chunk k (k in `which`) at k/8 of the LV, pattern from `seed` and k, then syncs.
    fn write_chunks(t: &Target, which: &[u64], seed: u64) -> Res<()> {
        let path = dev(t.lv);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| format!("open {path}: {e}"))?;
        for &k in which {
            file.seek(SeekFrom::Start(k * t.size / CHUNKS))
                .and_then(|_| file.write_all(&pattern(seed * 100 + k)))
                .map_err(|e| format!("write {path}: {e}"))?;
        }
        file.sync_all().map_err(|e| format!("sync {path}: {e}"))
    }

    /// Reads chunk 0 of the LV after dropping the page cache.
    fn read_chunk0(t: &Target) -> Res<Vec<u8>> {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        let path = dev(t.lv);
        let mut buf = vec![0u8; CHUNK];
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut buf))
            .map_err(|e| format!("read {path}: {e}"))?;
        Ok(buf)
    }

    fn timed<T>(what: &str, f: impl FnOnce() -> Result<T, vmsnap_lvm::Error>) -> Res<f64> {
        let start = Instant::now();
        f().map_err(|e| format!("{what}: {e}"))?;
        Ok(start.elapsed().as_secs_f64() * 1000.0)
    }

    fn lvm(l: &Lvm, sub: &str, args: &[&str]) -> Res<String> {
        l.run(sub, args)
            .map_err(|e| format!("lvm {sub} {args:?}: {e}"))
    }

    fn setup(l: &Lvm, device: &str) -> Res<()> {
        let _ = l.run("vgremove", ["-ff", "-y", VG]);
        lvm(l, "pvcreate", &["-ff", "-y", device])?;
        lvm(l, "vgcreate", &[VG, device])?;
        lvm(l, "lvcreate", &["-L", "512m", "-T", &format!("{VG}/pool")])?;
        for t in TARGETS.iter().take(3) {
            let size = format!("{}m", t.size / MIB);
            match t.kind {
                Kind::Thin => lvm(
                    l,
                    "lvcreate",
                    &["-V", &size, "-T", &format!("{VG}/pool"), "-n", t.lv],
                )?,
                Kind::Thick => lvm(l, "lvcreate", &["-L", &size, "-n", t.lv, VG])?,
            };
            write_chunks(t, &(0..CHUNKS).collect::<Vec<_>>(), 1)?;
        }
        Ok(())
    }

    /// One round on one LV: [snapshot, restore, delete] in ms.
    fn round(l: &Lvm, t: &Target, r: u64, tags: &[String]) -> Res<[f64; 3]> {
        let snap = format!("{}.snap", t.lv);
        let before = read_chunk0(t)?;
        let snap_ms = match t.kind {
            Kind::Thin => timed("snapshot_thin", || l.snapshot_thin(VG, t.lv, &snap, tags))?,
            Kind::Thick => {
                let size = thick_snapshot_size(t.size, 20.0, 16 * MIB);
                timed("snapshot_thick", || {
                    l.snapshot_thick(VG, t.lv, &snap, size, tags)
                })?
            }
        };
        write_chunks(t, t.overwrite, 1000 + r)?;
        if read_chunk0(t)? == before {
            return Err(format!("{}: overwrite did not change the data", t.label));
        }
        let restore_ms = match t.kind {
            Kind::Thin => timed("restore_thin", || l.restore_thin(VG, t.lv, &snap))?,
            Kind::Thick => timed("restore_thick", || l.restore_thick(VG, t.lv, &snap))?,
        };
        if read_chunk0(t)? != before {
            return Err(format!("{}: restore did not bring the data back", t.label));
        }
        let delete_ms = timed("remove", || l.remove(VG, &snap))?;
        Ok([snap_ms, restore_ms, delete_ms])
    }

    fn stats(v: &[f64]) -> (f64, f64, f64) {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        (median, s[0], s[n - 1])
    }

    fn run(n: u64, device: &str) -> Res<()> {
        let l = Lvm::new();
        let version = lvm(&l, "version", &[])?;
        for line in version.lines().take(3) {
            println!("INFO {}", line.trim());
        }
        let start = Instant::now();
        setup(&l, device)?;
        println!(
            "INFO setup (VG, 512 MiB pool, LVs, 32 MiB written to each) {} ms",
            start.elapsed().as_millis()
        );
        let tags = vmsnap_tags(
            "11111111-2222-3333-4444-555555555555",
            "66666666-7777-8888-9999-000000000000",
        )
        .map_err(|e| e.to_string())?;
        // times[target][op] = one value per round
        let mut times = vec![vec![Vec::new(); OPS.len()]; TARGETS.len()];
        // Baseline: what one LVM command costs here (one `lvs` report of one LV).
        let mut report = Vec::new();
        for r in 0..n {
            report.push(timed("lvs", || l.lv(VG, "thin-small"))?);
            // Alternate which thin size goes first.
            let order: [usize; 4] = if r % 2 == 0 {
                [0, 1, 2, 3]
            } else {
                [1, 0, 3, 2]
            };
            for i in order {
                let t = &TARGETS[i];
                let ms = round(&l, t, r, &tags)?;
                println!(
                    "ROUND {} {}: snapshot {:.1} restore {:.1} delete {:.1}",
                    r + 1,
                    t.label,
                    ms[0],
                    ms[1],
                    ms[2]
                );
                for (op, v) in ms.into_iter().enumerate() {
                    times[i][op].push(v);
                }
            }
        }
        let pool = l.lv(VG, "pool").map_err(|e| e.to_string())?;
        println!("INFO pool data {:?}% after the rounds", pool.data_percent);
        println!();
        println!("| LV | operation | N | median ms | min ms | max ms |");
        println!("|---|---|---:|---:|---:|---:|");
        for (i, t) in TARGETS.iter().enumerate() {
            for (op, name) in OPS.iter().enumerate() {
                let (med, min, max) = stats(&times[i][op]);
                println!(
                    "| {} | {name} | {} | {med:.0} | {min:.0} | {max:.0} |",
                    t.label,
                    times[i][op].len()
                );
            }
        }
        let (med, min, max) = stats(&report);
        println!(
            "| (baseline) | one `lvs` report of one LV | {n} | {med:.0} | {min:.0} | {max:.0} |"
        );
        println!();
        let (small, _, _) = stats(&times[0][1]);
        let (big, _, _) = stats(&times[1][1]);
        println!(
            "RATIO thin restore 4 GiB / 64 MiB (medians): {:.2} ({big:.0} ms / {small:.0} ms)",
            big / small
        );
        let _ = l.run("vgremove", ["-ff", "-y", VG]);
        Ok(())
    }

    pub fn main(args: &[String]) -> ExitCode {
        let (Some(n), Some(device), None) = (
            args.first()
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n > 0),
            args.get(1),
            args.get(2),
        ) else {
            eprintln!("usage: vmsnap-lvm-selftest --bench N DEVICE   (destroys DEVICE's content)");
            return ExitCode::from(2);
        };
        match run(n, device) {
            Ok(()) => {
                println!("BENCH PASS");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("ERROR {e}");
                println!("BENCH FAIL");
                ExitCode::FAILURE
            }
        }
    }
}
