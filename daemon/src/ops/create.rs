//! Create: takes a snapshot of every volume in one freeze, backend by backend, with the record
//! as its journal: the plan, written once before anything changes (step Freezing when the guest
//! is to be frozen, else Planned), Snapshotting when it goes on unfrozen, Done. Recovery of an
//! interrupted create keeps a snapshot whose volumes were all captured and undoes one whose were
//! not.

use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmsnap_api::{ExcludedVolume, Indication, SnapshotPhase};

use super::{check_deadline, OpContext, OpError, OpResult};
use crate::backends::Env;
use crate::config::Quiesce;
use crate::disks::SysfsLvmProbe;
use crate::domain::{self, parse_domain};
use crate::files;
use crate::hypervisor::{Host, RunState, ThawGuardHandle};
use crate::store::{source_indications, SnapshotRecord, StateCopy, Step};

/// Takes the snapshot `record` describes (phase InProgress, step Planned, no volumes yet).
/// Returns the record as it ended.
pub fn create(ctx: &OpContext, mut record: SnapshotRecord, allow_excluded: bool) -> SnapshotRecord {
    let deadline = Instant::now() + ctx.failure_deadline;
    let host = ctx.hypervisor.session();
    let result = host
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|host| create_steps(ctx, host.as_ref(), &mut record, allow_excluded, deadline));
    if let Err(error) = result {
        warn!(vm = %record.vm_name, snapshot = %record.name, %error, "snapshot failed");
        ctx.hold_vm();
        if let Ok(host) = &host {
            discard_all(&Env::new(ctx, host.as_ref()), &record);
        }
        record.phase = SnapshotPhase::Failed;
        record.ready_to_use = false;
        record.error = vmsnap_api::record_error(&error.to_string()).into();
        record.error_name = error.error_name().into();
        record.step = Step::Done;
        ctx.save_failed(&mut record);
        // The last step's text would stay on show beside the error.
        ctx.progress(&record, "");
    }
    record
}

fn create_steps(
    ctx: &OpContext,
    host: &dyn Host,
    record: &mut SnapshotRecord,
    allow_excluded: bool,
    deadline: Instant,
) -> OpResult<()> {
    let env = Env::new(ctx, host);
    let planned = plan_snapshot(&env, record, allow_excluded)?;
    ctx.check_abandoned("snapshot")?;
    // Why each indication was given, for sourceIndications.
    let mut notes: Vec<(Indication, String)> = Vec::new();
    let try_freeze = choose_quiesce(ctx, &planned, record, &mut notes);
    check_deadline(deadline, "snapshot")?;
    // One journal write before anything outside the record changes, for the preparation and,
    // when the guest is to be frozen, the freeze too: a write fewer before the freeze. A
    // restarted vmsnapd settles both alike (its thaw of a Freezing record is harmless when
    // nothing was frozen yet; the volumes not captured are discarded).
    record.step = if try_freeze {
        Step::Freezing
    } else {
        Step::Planned
    };
    debug!(vm = %record.vm_name, snapshot = %record.name, "planned the volumes");
    ctx.save(record)?;
    debug!(vm = %record.vm_name, snapshot = %record.name, "journaled the plan");
    for (backend, volumes) in ctx.backends.batches(&record.volumes)? {
        backend.prepare(&env, record, &volumes)?;
    }
    // For bench/steps.py, as the lines below: where the time before the freeze goes.
    debug!(vm = %record.vm_name, snapshot = %record.name, "prepared the disks");
    let freeze = if try_freeze {
        freeze_guest(ctx, host, record, &mut notes)?
    } else {
        None
    };
    if freeze.is_none() {
        record.step = Step::Snapshotting;
        ctx.save(record)?;
    }
    let result = capture(&env, record, &planned.vm.disks, freeze.is_some(), deadline);
    if let Some(frozen) = freeze {
        thaw_guest(ctx, host, record, frozen, &mut notes);
    }
    let result = result
        .and_then(|()| quiesced_as_required(ctx, record))
        .and_then(|()| {
            // The engine may have given the snapshot up while a call was blocked: what the
            // late call did is undone, as for any failure.
            if ctx.gate.succeed() {
                Ok(())
            } else {
                ctx.check_abandoned("snapshot")
            }
        });
    if let Err(error) = result {
        ctx.hold_vm();
        undo_all(&env, record);
        return Err(error);
    }
    record.source_indications = source_indications(record, &notes);
    record.phase = SnapshotPhase::Succeeded;
    record.ready_to_use = true;
    record.step = Step::Done;
    ctx.save(record)?;
    ctx.progress(record, "");
    Ok(())
}

/// Every backend undoes its capture (the VM's disks as before the snapshot).
fn undo_all(env: &Env, record: &SnapshotRecord) {
    if let Ok(batches) = env.ctx.backends.batches(&record.volumes) {
        for (backend, volumes) in batches {
            backend.undo(env, record, &volumes);
        }
    }
}

/// Every backend removes what a snapshot that was not taken left behind.
pub(super) fn discard_all(env: &Env, record: &SnapshotRecord) {
    if let Ok(batches) = env.ctx.backends.batches(&record.volumes) {
        for (backend, volumes) in batches {
            backend.discard(env, record, &volumes);
        }
    }
}

/// What planning learnt about the VM.
struct Planned {
    vm: domain::VmInfo,
    state: RunState,
    online: bool,
}

/// Reads the VM and plans one volume per disk with the backend that takes it (the others are
/// excluded), in the record; the caller journals the plan before anything outside the record
/// changes.
fn plan_snapshot(
    env: &Env,
    record: &mut SnapshotRecord,
    allow_excluded: bool,
) -> OpResult<Planned> {
    let (ctx, host) = (env.ctx, env.host);
    ctx.progress(record, "reading the VM definition");
    if inventory_shows_freezable(ctx, host, &record.vm_uuid) {
        // The guard's start (about 12 ms) then overlaps reading the VM too; if the VM turns
        // out not to be frozen, the guard goes unarmed with the session.
        host.prepare_thaw_guard(&record.vm_uuid, ctx.freeze_timeout);
    }
    let state = host.run_state(&record.vm_uuid)?;
    let inactive_xml = host.definition(&record.vm_uuid)?;
    let live_xml = host.current_definition(&record.vm_uuid)?;
    let vm = parse_domain(&live_xml, vmsnap_api::VmState::Unknown, &SysfsLvmProbe)
        .map_err(OpError::Refused)?;
    if agent_may_freeze(ctx, state, vm.agent) {
        // The guard starts now and gets ready while the disks are planned and prepared; it is
        // armed (its deadline running) only right before the freeze.
        host.prepare_thaw_guard(&record.vm_uuid, ctx.freeze_timeout);
    }
    let online = host.is_active(&record.vm_uuid)?;
    debug!(vm = %record.vm_name, snapshot = %record.name, "read the VM");

    let mut volumes = Vec::new();
    let mut excluded = Vec::new();
    for disk in &vm.disks {
        match ctx.backends.for_disk(disk) {
            Some(backend) => volumes.push(backend.plan(env, record, &live_xml, disk)?),
            None => excluded.push(ExcludedVolume {
                target: disk.target.clone(),
                reason: disk.reason.clone(),
            }),
        }
    }
    if !excluded.is_empty() && !allow_excluded {
        return Err(OpError::Refused(excluded_message(&excluded)));
    }
    // A VM with no disk to capture (only a cdrom, say) gets a snapshot of its definition
    // alone, with zero volumes, as KubeVirt's does.
    let extra = domain::extra_state(&inactive_xml, &record.vm_uuid).map_err(OpError::Refused)?;
    let copy_dir = ctx.store.state_copy_dir(&record.vm_uuid, &record.uuid);
    record.extra_state = extra
        .iter()
        .map(|e| StateCopy {
            kind: e.kind.to_string(),
            source: e.path.clone(),
            copy: copy_dir.join(e.kind).to_string_lossy().into_owned(),
        })
        .collect();
    record.domain_xml = crate::store::DomainXml::Held(inactive_xml);
    record.volumes = volumes;
    record.excluded = excluded.into();
    Ok(Planned { vm, state, online })
}

/// Decides whether to freeze and records the indications known before the freeze, with a
/// note for each (sourceIndications). Returns whether to try the freeze.
fn choose_quiesce(
    ctx: &OpContext,
    planned: &Planned,
    record: &mut SnapshotRecord,
    notes: &mut Vec<(Indication, String)>,
) -> bool {
    let running = planned.state == RunState::Running;
    let paused = planned.state == RunState::Paused;
    let try_freeze =
        !record.volumes.is_empty() && agent_may_freeze(ctx, planned.state, planned.vm.agent);
    record.indications = Vec::new();
    if planned.online {
        record.indications.push(Indication::Online);
    }
    if paused {
        record.indications.push(Indication::Paused);
    } else if running && !try_freeze && !record.volumes.is_empty() {
        record.indications.push(Indication::NoGuestAgent);
        notes.push((
            Indication::NoGuestAgent,
            format!(
                "the guest agent is {}: the snapshot is crash-consistent",
                planned.vm.agent.as_str().replace('-', " ")
            ),
        ));
    }
    if !record.excluded.is_empty() {
        record.indications.push(Indication::PartialSnapshot);
    }
    try_freeze
}

/// Whether a VM in `state` with this agent is to be frozen (when it has volumes to capture).
fn agent_may_freeze(ctx: &OpContext, state: RunState, agent: vmsnap_api::AgentState) -> bool {
    state == RunState::Running && agent_wanted(ctx, agent)
}

fn agent_wanted(ctx: &OpContext, agent: vmsnap_api::AgentState) -> bool {
    match ctx.quiesce {
        Quiesce::Auto => agent == vmsnap_api::AgentState::Connected,
        Quiesce::Always => agent != vmsnap_api::AgentState::NotConfigured,
    }
}

/// Whether the inventory (libvirt's events keep it current) shows `vm` as one whose guest
/// this snapshot will freeze: a hint only, read before the VM itself is.
fn inventory_shows_freezable(ctx: &OpContext, host: &dyn Host, vm: &str) -> bool {
    host.known_domains().is_some_and(|known| {
        known.vms.iter().any(|v| {
            v.uuid.eq_ignore_ascii_case(vm)
                && v.state == vmsnap_api::VmState::Running
                && agent_wanted(ctx, v.agent)
        })
    })
}

/// An armed thaw guard and when the freeze began.
type Frozen = (Box<dyn ThawGuardHandle>, Instant);

/// Freezes the guest's filesystems under a thaw guard. Returns the armed guard and when the
/// freeze began, or `None` when the freeze failed (the guest is thawed again, the indication and
/// its note are recorded); an error only when `require_quiesce` forbids going on unfrozen.
fn freeze_guest(
    ctx: &OpContext,
    host: &dyn Host,
    record: &mut SnapshotRecord,
    notes: &mut Vec<(Indication, String)>,
) -> OpResult<Option<Frozen>> {
    // The record says Freezing already (written before the preparation).
    let guard = host.arm_thaw_guard(&record.vm_uuid, ctx.freeze_timeout)?;
    debug!(vm = %record.vm_name, snapshot = %record.name, "armed the thaw guard");
    ctx.progress(record, "freezing the guest's filesystems");
    // Bound the freeze call itself: half the freeze deadline, so a freeze that does not
    // answer in time fails (QuiesceFailed) with time left to snapshot and thaw.
    let answer_within = Duration::from_secs((ctx.freeze_timeout.as_secs() / 2).clamp(1, 60));
    let started = Instant::now();
    // With disks left out, only the filesystems on the captured disks need to stop.
    let captured: Vec<String> = record.volumes.iter().map(|v| v.target.clone()).collect();
    let only_disks = (!record.excluded.is_empty()).then_some(captured.as_slice());
    let failure = match host.freeze(&record.vm_uuid, answer_within, only_disks) {
        Ok(count) => {
            record.frozen_filesystems = count;
            record.indications.push(Indication::GuestAgent);
            return Ok(Some((guard, started)));
        }
        Err(failure) => failure,
    };
    // libvirt sends the freeze only after the agent answered a sync, so a failed freeze
    // normally froze nothing; thaw anyway in case the agent froze late, and leave it to the
    // guard (by dropping it armed) if even that fails.
    match host.thaw(&record.vm_uuid) {
        Ok(_) => {
            let _ = guard.disarm();
        }
        Err(_) => drop(guard),
    }
    if ctx.require_quiesce {
        return Err(OpError::Refused(format!(
            "the guest's filesystems could not be frozen ({}); require_quiesce is set, \
             so no snapshot was taken",
            failure.message
        )));
    }
    warn!(vm = %record.vm_name, error = %failure.message, "freeze failed; taking a crash-consistent snapshot");
    let (indication, what) = if failure.timed_out {
        (
            Indication::QuiesceTimeout,
            "the guest agent did not answer the freeze in time",
        )
    } else {
        (
            Indication::QuiesceFailed,
            "the guest agent could not freeze the filesystems",
        )
    };
    record.indications.push(indication);
    notes.push((
        indication,
        format!(
            "{what} ({}): the snapshot is crash-consistent",
            failure.message
        ),
    ));
    Ok(None)
}

/// Captures every volume, backend by backend in the registry's order (cheapest to undo first),
/// then copies the small state files. Frozen or not: only the captures and the small copies,
/// nothing slow. A backend that fails has undone its own part; the ones before it are undone
/// here.
fn capture(
    env: &Env,
    record: &SnapshotRecord,
    disks: &[vmsnap_api::DiskInfo],
    frozen: bool,
    deadline: Instant,
) -> OpResult<()> {
    let ctx = env.ctx;
    ctx.faults.point("create-before-snapshot");
    check_deadline(deadline, "snapshot")?;
    if !frozen {
        ctx.progress(record, "snapshotting the disks");
    }
    let batches = ctx.backends.batches(&record.volumes)?;
    for (done, (backend, volumes)) in batches.iter().enumerate() {
        if let Err(e) = backend.capture(env, record, volumes, disks) {
            for (earlier, their_volumes) in &batches[..done] {
                earlier.undo(env, record, their_volumes);
            }
            return Err(e);
        }
    }
    ctx.faults.point("create-after-snapshot");
    copy_extra_state(record)
}

/// Thaws the guest and disarms its guard; a thaw that fails is left to the guard (dropped
/// armed, it thaws at once). A guard that had thawed first means the snapshot was not quiesced.
fn thaw_guest(
    ctx: &OpContext,
    host: &dyn Host,
    record: &mut SnapshotRecord,
    (guard, started): Frozen,
    notes: &mut Vec<(Indication, String)>,
) {
    match host.thaw(&record.vm_uuid) {
        Ok(_) => {
            record.freeze_duration_ms = started.elapsed().as_millis() as u64;
            if let Err(e) = guard.disarm() {
                // The guard may have thawed at its deadline before the disks were
                // snapshotted: the snapshot cannot claim a quiesced guest then.
                warn!(error = %e, "thaw guard did not stop cleanly; recording QuiesceTimeout");
                record.indications.retain(|i| *i != Indication::GuestAgent);
                record.indications.push(Indication::QuiesceTimeout);
                notes.push((
                    Indication::QuiesceTimeout,
                    format!(
                        "the guest may have been thawed at freeze_timeout ({} s) before the \
                         disks were snapshotted ({e}): the snapshot is crash-consistent",
                        ctx.freeze_timeout.as_secs()
                    ),
                ));
            }
        }
        // Dropping the armed guard makes it thaw at once, on its own connection.
        Err(e) => {
            record.freeze_duration_ms = started.elapsed().as_millis() as u64;
            warn!(vm = %record.vm_name, error = %e, "thaw failed; the thaw guard retries");
            drop(guard);
        }
    }
    ctx.progress(record, "thawed the guest's filesystems");
}

/// With `require_quiesce`, a snapshot the guest was not frozen for is undone.
fn quiesced_as_required(ctx: &OpContext, record: &SnapshotRecord) -> OpResult<()> {
    if ctx.require_quiesce
        && (record.indications.contains(&Indication::QuiesceFailed)
            || record.indications.contains(&Indication::QuiesceTimeout))
    {
        Err(OpError::Refused(
            "the guest was thawed before the disks were snapshotted; require_quiesce is \
             set, so the snapshot was undone"
                .to_string(),
        ))
    } else {
        Ok(())
    }
}

pub fn excluded_message(excluded: &[ExcludedVolume]) -> String {
    let list: Vec<String> = excluded
        .iter()
        .map(|e| format!("{} ({})", e.target, e.reason))
        .collect();
    format!(
        "the VM has disks that cannot be snapshotted: {}; allow them to be left out with allow_excluded",
        list.join("; ")
    )
}

/// Copies the VM's NVRAM file and TPM state folder into the snapshot's folder. Each copy is
/// made under a `.partial` name and renamed into place once complete, and the folder is synced:
/// recovery takes a copy that exists as complete, so a vmsnapd stopped mid-copy leaves only a
/// `.partial` (in the snapshot's own folder, removed with the record or by the next attempt).
fn copy_extra_state(record: &SnapshotRecord) -> OpResult<()> {
    let mut folders = std::collections::BTreeSet::new();
    for copy in &record.extra_state {
        let source = Path::new(&copy.source);
        let target = Path::new(&copy.copy);
        let failed = |e: std::io::Error| {
            format!(
                "cannot copy the VM's {} state {}: {e}",
                copy.kind, copy.source
            )
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            folders.insert(parent.to_path_buf());
        }
        let partial = std::path::PathBuf::from(format!("{}.partial", copy.copy));
        files::remove_leftover(&partial).map_err(failed)?;
        let copied = if source.is_dir() {
            files::copy_dir_new(source, &partial)
        } else {
            files::copy_file_new(source, &partial)
        };
        copied
            .and_then(|()| std::fs::rename(&partial, target))
            .map_err(failed)?;
    }
    for folder in folders {
        std::fs::File::open(&folder)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", folder.display()))?;
    }
    Ok(())
}

/// Settles a create a previous vmsnapd left unfinished: thaws the guest if it may be frozen,
/// keeps the snapshot if every volume was captured, undoes it otherwise.
pub(super) fn recover_create(ctx: &OpContext, record: &mut SnapshotRecord) -> OpResult<()> {
    let host = ctx.hypervisor.session()?;
    let env = Env::new(ctx, host.as_ref());
    if record.step == Step::Freezing {
        // Harmless when not frozen; a frozen guest must not wait for anything else.
        match host.thaw(&record.vm_uuid) {
            Ok(_) => info!(vm = %record.vm_name, "thawed the guest left frozen"),
            Err(e) => info!(vm = %record.vm_name, error = %e, "thaw on recovery"),
        }
    }
    let mut taken = 0;
    for volume in &record.volumes {
        if ctx
            .backends
            .for_volume(volume)?
            .is_captured(&env, record, volume)?
        {
            taken += 1;
        }
    }
    let copies_complete = record
        .extra_state
        .iter()
        .all(|c| Path::new(&c.copy).exists());
    if taken == record.volumes.len() && taken > 0 && copies_complete {
        record.phase = SnapshotPhase::Succeeded;
        record.ready_to_use = true;
        record.step = Step::Done;
        ctx.save(record)?;
        info!(vm = %record.vm_name, snapshot = %record.name, "the interrupted snapshot had been taken: Succeeded");
        return Ok(());
    }
    if taken > 0 {
        undo_all(&env, record);
    }
    discard_all(&env, record);
    Err(OpError::Refused(
        "vmsnapd stopped before the snapshot was complete; nothing was kept".to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose NVRAM file and TPM folder are `nvram` and `tpm` in `vm`, copied into
    /// `snapshot`.
    fn record_copying(vm: &Path, snapshot: &Path) -> SnapshotRecord {
        let mut record = SnapshotRecord::request("s".into(), String::new(), "vm", "u", vec![]);
        record.extra_state = ["nvram", "tpm"]
            .iter()
            .map(|kind| StateCopy {
                kind: kind.to_string(),
                source: vm.join(kind).to_string_lossy().into_owned(),
                copy: snapshot.join(kind).to_string_lossy().into_owned(),
            })
            .collect();
        record
    }

    #[test]
    fn state_copies_appear_only_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vm, snapshot) = (dir.path().join("vm"), dir.path().join("snapshot"));
        std::fs::create_dir_all(vm.join("tpm/sub")).expect("mkdir");
        std::fs::write(vm.join("nvram"), b"variables").expect("write");
        std::fs::write(vm.join("tpm/sub/state"), b"tpm state").expect("write");
        // What a vmsnapd stopped mid-copy left: replaced, never taken for the copy.
        std::fs::create_dir_all(snapshot.join("tpm.partial")).expect("mkdir");
        std::fs::write(snapshot.join("nvram.partial"), b"varia").expect("write");
        let record = record_copying(&vm, &snapshot);

        copy_extra_state(&record).expect("copied");
        assert_eq!(
            std::fs::read(snapshot.join("nvram")).expect("nvram"),
            b"variables"
        );
        assert_eq!(
            std::fs::read(snapshot.join("tpm/sub/state")).expect("tpm"),
            b"tpm state"
        );
        assert!(!files::path_taken(&snapshot.join("nvram.partial")));
        assert!(!files::path_taken(&snapshot.join("tpm.partial")));
    }

    #[test]
    fn a_copy_that_fails_half_way_leaves_no_copy_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vm, snapshot) = (dir.path().join("vm"), dir.path().join("snapshot"));
        std::fs::create_dir_all(vm.join("tpm")).expect("mkdir");
        std::fs::write(vm.join("nvram"), b"variables").expect("write");
        std::fs::write(vm.join("tpm/a"), b"first").expect("write");
        // The copy of the folder stops at this symlink, after some of it was copied.
        std::os::unix::fs::symlink("/etc/passwd", vm.join("tpm/b")).expect("symlink");
        let record = record_copying(&vm, &snapshot);

        copy_extra_state(&record).expect_err("refused");
        // The NVRAM copy is complete; the TPM folder is not where recovery would take it.
        assert!(snapshot.join("nvram").is_file());
        assert!(!files::path_taken(&snapshot.join("tpm")));
    }
}
