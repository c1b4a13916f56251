//! Restore: a VM back to one of its snapshots, in place or as a new VM. Runs on an operation
//! thread like the snapshot operations, with the restore record as its journal (Planned,
//! Applying, Committed, Done).
//!
//! Each backend stages the restored disk (a qcow2 backend a fresh overlay on the snapshot's
//! image, so the cost does not grow with the disk size and the snapshot stays restorable and
//! deletable; an LVM backend a thin clone for a new VM). Backends that restore data in place
//! (LVM, in place) do so after the point of no return (step Committed), each step journaled.
//! In place, the definition comes back from the content record (same name and UUID); disks
//! attached since are detached (their images left alone) and listed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vmsnap_api::{DetachedDisk, RestorePhase, SnapshotPhase, VmState, VolumeRestore};

use super::{create, now_rfc3339, OpContext, OpError, OpResult};
use crate::backends::Env;
use crate::disks::SysfsLvmProbe;
use crate::domain::{self, parse_domain};
use crate::files;
use crate::hypervisor::Host;
use crate::store::{RestoreRecord, RestoreStep, SnapshotRecord};

/// The journal's mark for a volume whose in-place restore finished.
pub const STEP_DONE: &str = "done";

/// How long a VM gets to shut down by itself before it is forced off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Set when vmsnapd shuts down: restores waiting for their VM give up (having changed nothing)
/// so the shutdown is not held up by a VM that may never stop.
static WAITS_CANCELLED: AtomicBool = AtomicBool::new(false);

/// Makes every restore that waits for its VM to be shut off give up.
pub fn cancel_waits() {
    WAITS_CANCELLED.store(true, Ordering::SeqCst);
}

/// Restores waiting for their VM, by UUID: `false` while waiting, `true` once deleted (the
/// wait then gives up). A restore leaves the map, under its lock, when it stops waiting, so a
/// deletion either cancels it before anything changed or finds it gone and is refused.
static WAITING: Mutex<BTreeMap<String, bool>> = Mutex::new(BTreeMap::new());

fn waiting() -> std::sync::MutexGuard<'static, BTreeMap<String, bool>> {
    WAITING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Cancels the restore `uuid` if it is still waiting for its VM; false if it is not waiting
/// (any more).
pub fn cancel_wait(uuid: &str) -> bool {
    match waiting().get_mut(uuid) {
        Some(cancelled) => {
            *cancelled = true;
            true
        }
        None => false,
    }
}

/// The error of a restore deleted while it waited.
pub const DELETED_WHILE_WAITING: &str =
    "the restore was deleted while it waited for the VM to be shut off; nothing was changed";

/// Suffix of a NVRAM copy or TPM state copy waiting to be renamed into place.
const PENDING: &str = ".vmsnap-restore";
/// Suffix of the TPM state a restore's copy replaces, until the copy is in place.
const REPLACED: &str = ".vmsnap-replaced";

/// Runs the restore `record` describes. `records` are every snapshot record (for the safety
/// snapshot's name and for pruning images nothing claims any more).
pub fn restore(
    ctx: &OpContext,
    mut record: RestoreRecord,
    snapshot: SnapshotRecord,
    mut records: Vec<Arc<SnapshotRecord>>,
) {
    let mut stopped = false;
    if let Err(error) = restore_steps(ctx, &mut record, &snapshot, &mut records, &mut stopped) {
        warn!(vm = %record.vm_name, snapshot = %record.snapshot_name, %error, "restore failed");
        record.error_name = error.error_name();
        let mut error = error.to_string();
        // Past the point of no return the journal stays, so the next start finishes it.
        let forward_pending = matches!(
            &record.step,
            RestoreStep::Committed { volume_steps, .. } if !volume_steps.is_empty()
        );
        if stopped && !forward_pending {
            // Nothing changed: the VM this restore shut down runs again.
            ctx.release_vm_lock();
            let started = ctx.hypervisor.session().and_then(|host| {
                // Someone may have started it meanwhile.
                if host.is_active(&record.vm_uuid)? {
                    return Ok(false);
                }
                host.start(&record.vm_uuid).map(|()| true)
            });
            match started {
                Ok(true) => error.push_str("; the VM was started again"),
                Ok(false) => {}
                Err(e) => error.push_str(&format!("; the VM stays off (it did not start: {e})")),
            }
        }
        record.phase = RestorePhase::Failed;
        record.error = vmsnap_api::record_error(&error);
        if !forward_pending {
            record.step = RestoreStep::Done;
        }
        ctx.save_restore_failed(&mut record);
    }
    ctx.restore_progress(&record, "");
}

fn restore_steps(
    ctx: &OpContext,
    record: &mut RestoreRecord,
    snapshot: &SnapshotRecord,
    records: &mut Vec<Arc<SnapshotRecord>>,
    stopped: &mut bool,
) -> OpResult<()> {
    let policy_waits = matches!(
        record.readiness_policy.as_str(),
        "WaitGracePeriod" | "WaitEventually"
    );
    if !record.new_vm && policy_waits {
        // Before the session the rest uses: the wait outlives libvirtd restarts.
        waiting().insert(record.uuid.clone(), false);
        let waited = wait_until_shut_off(ctx, record);
        // Leaving the map decides: deleted before this point means cancelled.
        let deleted = waiting().remove(&record.uuid).unwrap_or(false);
        waited?;
        if deleted {
            return Err(OpError::Refused(DELETED_WHILE_WAITING.to_string()));
        }
    }
    let host = ctx.hypervisor.session()?;
    let env = Env::new(ctx, host.as_ref());
    check_restorable(&env, record, snapshot)?;
    let (previous_xml, detached) = prepare_target(&env, record, snapshot, records, stopped)?;
    plan_restores(ctx, record, snapshot)?;
    record.not_restored = snapshot.excluded.to_vec();
    record.detached = detached;
    record.step = RestoreStep::Applying {
        previous_xml: previous_xml.clone(),
    };
    ctx.save_restore(record)?;

    if let Err(error) = apply(&env, record, snapshot, &previous_xml) {
        if let RestoreStep::Committed { volume_steps, .. } = &record.step {
            if !volume_steps.is_empty() {
                // A disk's data was replaced: there is no going back, only forward.
                return Err(OpError::Storage(format!(
                    "{error}; the VM's disks are partly restored in place: vmsnapd finishes this restore when it next starts (keep the VM off until then)"
                )));
            }
        }
        roll_back(&env, record, snapshot, &previous_xml);
        return Err(error);
    }
    finish(&env, record, records, &previous_xml)
}

/// Whether the snapshot can be restored at all: ready, and every volume intact (images and
/// their backing chains there, LVs present and valid); a new VM's needs too. Checked before
/// anything changes, the safety snapshot included.
fn check_restorable(env: &Env, record: &RestoreRecord, snapshot: &SnapshotRecord) -> OpResult<()> {
    if snapshot.phase != SnapshotPhase::Succeeded || !snapshot.ready_to_use {
        return Err(OpError::Refused(format!(
            "snapshot '{}' is {}, not ready to restore",
            snapshot.name,
            snapshot.phase.as_str()
        )));
    }
    for volume in &snapshot.volumes {
        env.ctx
            .backends
            .for_volume(volume)?
            .check_intact(env, snapshot, volume)?;
    }
    if record.new_vm {
        for volume in &snapshot.volumes {
            env.ctx
                .backends
                .for_volume(volume)?
                .check_restore_target(env, true, volume)?;
        }
    }
    Ok(())
}

/// In place: the VM shut down (if asked), each volume's target checked, the disks attached
/// since the snapshot listed, the safety snapshot taken. Returns the definition to put back
/// should the restore fail, and the disks it detaches. For a new VM: its name must be free.
fn prepare_target(
    env: &Env,
    record: &mut RestoreRecord,
    snapshot: &SnapshotRecord,
    records: &mut Vec<Arc<SnapshotRecord>>,
    stopped: &mut bool,
) -> OpResult<(String, Vec<DetachedDisk>)> {
    let (ctx, host) = (env.ctx, env.host);
    if record.new_vm {
        if host.lookup_name(&record.target_name)?.is_some() {
            return Err(OpError::Refused(format!(
                "a VM named '{}' already exists",
                record.target_name
            )));
        }
        return Ok((String::new(), Vec::new()));
    }
    if !host.exists(&record.vm_uuid)? {
        return Err(OpError::VmNotFound(record.vm_uuid.clone()));
    }
    if record.phase == RestorePhase::Waiting {
        record.phase = RestorePhase::InProgress;
        ctx.save_restore(record)?;
    }
    if host.is_active(&record.vm_uuid)? {
        if !record.stop_target {
            return Err(OpError::Refused(format!(
                "VM '{}' is running; stop it first",
                record.vm_name
            )));
        }
        shut_down(ctx, host, record)?;
        *stopped = true;
    }
    for volume in &snapshot.volumes {
        ctx.backends
            .for_volume(volume)?
            .check_restore_target(env, false, volume)?;
    }
    // Named as the user knows them, before a safety snapshot puts overlays on top.
    let original = host.public_definition(&record.vm_uuid)?;
    let detached = detached_disks(&original, &recorded_definition(ctx, snapshot)?)?;
    if record.take_safety_snapshot {
        take_safety_snapshot(ctx, record, records)?;
    }
    let previous_xml = host.definition(&record.vm_uuid)?;
    Ok((previous_xml, detached))
}

/// Plans each volume's restored image with its backend, named after the target VM and this
/// restore.
fn plan_restores(
    ctx: &OpContext,
    record: &mut RestoreRecord,
    snapshot: &SnapshotRecord,
) -> OpResult<()> {
    let mut restores = Vec::new();
    for volume in &snapshot.volumes {
        restores.push(
            ctx.backends
                .for_volume(volume)?
                .plan_restore(record, volume)?,
        );
    }
    record.restores = restores;
    Ok(())
}

/// The volume each planned restore is of.
fn planned<'a>(
    record: &'a RestoreRecord,
    snapshot: &'a SnapshotRecord,
) -> impl Iterator<Item = (&'a VolumeRestore, &'a crate::store::VolumeRecord)> {
    record.restores.iter().filter_map(|r| {
        snapshot
            .volumes
            .iter()
            .find(|v| v.target == r.target)
            .map(|v| (r, v))
    })
}

/// Stages every restored image and the NVRAM state, restores in place the volumes whose
/// backend does so (from then on the restore only goes forward), and defines the VM.
fn apply(
    env: &Env,
    record: &mut RestoreRecord,
    snapshot: &SnapshotRecord,
    previous_xml: &str,
) -> OpResult<()> {
    let ctx = env.ctx;
    ctx.restore_progress(record, "creating the new disk overlays");
    for (restore, volume) in planned(record, snapshot) {
        ctx.backends
            .for_volume(volume)?
            .stage_restore(env, record, volume, restore)?;
    }
    for copy in snapshot.extra_state.iter().filter(|c| c.kind == "nvram") {
        let target = nvram_target_path(record, &copy.source);
        let pending = format!("{target}{PENDING}");
        // A pending copy is vmsnapd's own, left by an interrupted attempt: it is made again.
        if let Err(e) = std::fs::remove_file(&pending) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(OpError::Storage(format!("cannot replace {pending}: {e}")));
            }
        }
        files::copy_file_new(Path::new(&copy.copy), Path::new(&pending)).map_err(|e| {
            OpError::Storage(format!("cannot stage the NVRAM copy for {target}: {e}"))
        })?;
    }
    ctx.faults.point("restore-before-define");
    // libvirt cannot refuse a start meanwhile: a VM started by someone else during the restore
    // runs on its old disks, and restoring under it would lose what it writes. Last check
    // before anything of the VM changes.
    if !record.new_vm && env.host.is_active(&record.vm_uuid)? {
        return Err(OpError::Refused(format!(
            "VM '{}' was started during the restore (by someone else); nothing of it was \
             restored: stop it and restore again",
            record.vm_name
        )));
    }
    if !record.new_vm {
        restore_in_place(env, record, snapshot, previous_xml)?;
    }
    define_restored(env, record, snapshot)
}

/// The point of no return: the volumes whose backend replaces the disk's data in place, each
/// step journaled before it begins.
fn restore_in_place(
    env: &Env,
    record: &mut RestoreRecord,
    snapshot: &SnapshotRecord,
    previous_xml: &str,
) -> OpResult<()> {
    let ctx = env.ctx;
    let mut in_place = Vec::new();
    for volume in &snapshot.volumes {
        let backend = ctx.backends.for_volume(volume)?;
        if backend.restores_in_place(volume) {
            in_place.push((backend, volume));
        }
    }
    if in_place.is_empty() {
        return Ok(());
    }
    record.step = RestoreStep::Committed {
        previous_xml: previous_xml.to_string(),
        volume_steps: BTreeMap::new(),
    };
    ctx.save_restore(record)?;
    for (backend, volume) in in_place {
        ctx.restore_progress(
            record,
            format!(
                "restoring {} volume of disk {}",
                backend.name().to_uppercase(),
                volume.target
            ),
        );
        let mut before = |step: &'static str| -> OpResult<()> {
            set_volume_step(record, &volume.target, step);
            ctx.save_restore(record)?;
            ctx.faults
                .point(&format!("restore-{}-{step}", backend.name()));
            Ok(())
        };
        backend.restore_in_place(env, volume, &mut before)?;
        set_volume_step(record, &volume.target, STEP_DONE);
        ctx.save_restore(record)?;
    }
    Ok(())
}

fn set_volume_step(record: &mut RestoreRecord, target: &str, step: &str) {
    if let RestoreStep::Committed { volume_steps, .. } = &mut record.step {
        volume_steps.insert(target.to_string(), step.to_string());
    }
}

/// Defines the restored VM: the snapshot's definition on the restored disks (and, for a new
/// VM, a new identity). Deterministic, so recovery can define it again.
fn define_restored(
    env: &Env,
    record: &mut RestoreRecord,
    snapshot: &SnapshotRecord,
) -> OpResult<()> {
    let mut xml = recorded_definition(env.ctx, snapshot)?;
    for (restore, volume) in planned(record, snapshot) {
        let backend = env.ctx.backends.for_volume(volume)?;
        if let Some((source, format)) = backend.restored_source(record.new_vm, volume, restore) {
            xml = domain::set_disk_source(&xml, &restore.target, &source, format)
                .map_err(OpError::Refused)?;
        }
    }
    let nvram_target = snapshot
        .extra_state
        .iter()
        .filter(|c| c.kind == "nvram")
        .map(|c| nvram_target_path(record, &c.source))
        .next_back();
    if record.new_vm {
        xml = domain::for_new_vm(
            &xml,
            &record.vm_name,
            &record.target_name,
            nvram_target.as_deref(),
        )
        .map_err(OpError::Refused)?;
    }
    env.ctx.restore_progress(record, "defining the VM");
    record.target_uuid = env
        .host
        .define(&xml)
        .map_err(|e| OpError::Libvirt(format!("libvirt refused the restored definition: {e}")))?;
    env.ctx.faults.point("restore-after-define");
    Ok(())
}

/// After the definition is in place: NVRAM and TPM state into place, what the restore made
/// kept, what the VM used before and nothing claims any more released, the VM started if
/// asked.
fn finish(
    env: &Env,
    record: &mut RestoreRecord,
    records: &[Arc<SnapshotRecord>],
    previous_xml: &str,
) -> OpResult<()> {
    let ctx = env.ctx;
    let snapshot = records
        .iter()
        .find(|s| s.uuid == record.snapshot_uuid)
        .cloned();
    if let Some(snapshot) = &snapshot {
        put_state_back(record, snapshot)?;
        for (restore, volume) in planned(record, snapshot) {
            ctx.backends
                .for_volume(volume)?
                .keep_restored(env, record, restore)?;
        }
    }
    // The disks the VM used before (in place) are the old branch.
    if !previous_xml.is_empty() {
        let vm = parse_domain(previous_xml, VmState::Unknown, &SysfsLvmProbe)
            .map_err(OpError::Refused)?;
        for disk in &vm.disks {
            let Some(backend) = ctx.backends.for_disk(disk) else {
                continue;
            };
            // The disk's source as its backend names it (a file's path, `rbd:POOL/IMAGE`).
            if !disk.source.is_empty() {
                backend.release_replaced(env, &disk.source, records)?;
            }
        }
    }
    info!(vm = %record.vm_name, snapshot = %record.snapshot_name, target = %record.target_name, "restored");
    if record.start {
        ctx.restore_progress(record, "starting the VM");
        ctx.release_vm_lock();
        if let Err(e) = env.host.start(&record.target_uuid) {
            // The restore itself is done and stays so; the start is reported beside it.
            record.error = format!("restored, but the VM did not start: {e}");
            record.error_name = e.error_name();
        }
    }
    record.phase = RestorePhase::Succeeded;
    record.complete = true;
    record.restore_time = now_rfc3339();
    record.step = RestoreStep::Done;
    ctx.save_restore(record)?;
    Ok(())
}

/// The NVRAM copy renamed into place, the TPM state copied back.
fn put_state_back(record: &RestoreRecord, snapshot: &SnapshotRecord) -> OpResult<()> {
    for copy in &snapshot.extra_state {
        match copy.kind.as_str() {
            "nvram" => {
                let target = nvram_target_path(record, &copy.source);
                let pending = format!("{target}{PENDING}");
                if Path::new(&pending).exists() {
                    std::fs::rename(&pending, &target).map_err(|e| {
                        OpError::Storage(format!("cannot put the NVRAM back at {target}: {e}"))
                    })?;
                }
            }
            "tpm" => {
                let uuid = if record.new_vm {
                    &record.target_uuid
                } else {
                    &record.vm_uuid
                };
                let target = format!("/var/lib/libvirt/swtpm/{uuid}");
                // Whole or not at all: the VM's TPM state is either as it was or the
                // snapshot's, whenever this stops.
                files::replace_dir_with_copy(
                    Path::new(&copy.copy),
                    Path::new(&target),
                    Path::new(&format!("{target}{PENDING}")),
                    Path::new(&format!("{target}{REPLACED}")),
                )
                .map_err(|e| OpError::Storage(format!("cannot put the TPM state back: {e}")))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Where the restored VM's NVRAM file goes: its own path in place, a new file next to it for a
/// new VM.
fn nvram_target_path(record: &RestoreRecord, source: &str) -> String {
    if record.new_vm {
        Path::new(source)
            .with_file_name(format!("{}_VARS.fd", record.target_name))
            .to_string_lossy()
            .into_owned()
    } else {
        source.to_string()
    }
}

/// NVRAM copies this restore stages next to their final place.
fn staged_nvram(record: &RestoreRecord, snapshot: &SnapshotRecord) -> Vec<String> {
    snapshot
        .extra_state
        .iter()
        .filter(|c| c.kind == "nvram")
        .map(|c| format!("{}{PENDING}", nvram_target_path(record, &c.source)))
        .collect()
}

/// Undoes `apply`: back to the previous definition, what the backends staged and the staged
/// copies removed.
fn roll_back(env: &Env, record: &RestoreRecord, snapshot: &SnapshotRecord, previous_xml: &str) {
    let host = env.host;
    if record.new_vm {
        if let Ok(Some(uuid)) = host.lookup_name(&record.target_name) {
            let uses_ours = host
                .public_definition(&uuid)
                .map(|xml| record.restores.iter().any(|r| xml.contains(&r.to_image)))
                .unwrap_or(false);
            if uses_ours {
                let _ = host.undefine(&uuid);
            }
        }
    } else if !previous_xml.is_empty() {
        if let Err(e) = host.define(previous_xml) {
            warn!(error = %e, "cannot put the previous definition back");
        }
    }
    for (restore, volume) in planned(record, snapshot) {
        if let Ok(backend) = env.ctx.backends.for_volume(volume) {
            backend.discard_restored(env, record, volume, restore);
        }
    }
    for pending in staged_nvram(record, snapshot) {
        let _ = std::fs::remove_file(pending);
    }
}

/// Whether the VM runs, on a session kept across calls and opened again when the hypervisor
/// went away (libvirtd restarted): `None` while it cannot be reached. A VM that no longer
/// exists is an error.
fn vm_active(
    ctx: &OpContext,
    record: &RestoreRecord,
    session: &mut Option<Box<dyn Host>>,
) -> OpResult<Option<bool>> {
    if let Some(host) = session.as_ref() {
        if let Ok(active) = host.is_active(&record.vm_uuid) {
            return Ok(Some(active));
        }
    }
    *session = None;
    let Ok(host) = ctx.hypervisor.session() else {
        return Ok(None);
    };
    match host.is_active(&record.vm_uuid) {
        Ok(active) => {
            *session = Some(host);
            Ok(Some(active))
        }
        Err(OpError::VmNotFound(_)) => Err(OpError::Refused(format!(
            "VM '{}' was undefined while the restore waited for it to be shut off",
            record.vm_name
        ))),
        Err(_) => Ok(None),
    }
}

/// targetReadinessPolicy WaitGracePeriod and WaitEventually: the restore waits in phase Waiting
/// until libvirt reports the VM shut off (by its user or the guest), up to
/// `restore_grace_period` for WaitGracePeriod. Nothing has changed while it waits, so giving
/// up leaves the VM as it was. A libvirtd restart meanwhile is waited out.
fn wait_until_shut_off(ctx: &OpContext, record: &mut RestoreRecord) -> OpResult<()> {
    let eventually = record.readiness_policy == "WaitEventually";
    let grace = ctx.restore_grace_period;
    let deadline = Instant::now() + grace;
    let mut session = None;
    if vm_active(ctx, record, &mut session)? == Some(false) {
        return Ok(());
    }
    if record.phase != RestorePhase::Waiting {
        record.phase = RestorePhase::Waiting;
        ctx.save_restore(record)?;
    }
    let grace_text = humantime::format_duration(grace).to_string();
    if eventually {
        ctx.restore_progress(record, "waiting for the VM to be shut off");
    } else {
        ctx.restore_progress(
            record,
            format!("waiting up to {grace_text} for the VM to be shut off"),
        );
    }
    let mut unreachable_reported = false;
    loop {
        if waiting().get(&record.uuid).copied().unwrap_or(false) {
            return Err(OpError::Refused(DELETED_WHILE_WAITING.to_string()));
        }
        match vm_active(ctx, record, &mut session)? {
            Some(false) => return Ok(()),
            Some(true) => unreachable_reported = false,
            None if !unreachable_reported => {
                warn!(vm = %record.vm_name, "libvirt unreachable while waiting for the VM to be shut off; retrying");
                unreachable_reported = true;
            }
            None => {}
        }
        if WAITS_CANCELLED.load(Ordering::SeqCst) {
            return Err(OpError::Refused(format!(
                "vmsnapd stopped while the restore waited for VM '{}' to be shut off; nothing \
                 was changed",
                record.vm_name
            )));
        }
        if !eventually && Instant::now() >= deadline {
            return Err(OpError::DeadlineExceeded(format!(
                "VM '{}' was not shut off within the grace period ({grace_text}, \
                 targetReadinessPolicy WaitGracePeriod); nothing was changed",
                record.vm_name
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn shut_down(ctx: &OpContext, host: &dyn Host, record: &RestoreRecord) -> OpResult<()> {
    ctx.restore_progress(record, "shutting the VM down");
    let _ = host.shutdown(&record.vm_uuid);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while host.is_active(&record.vm_uuid)? {
        if Instant::now() > deadline {
            ctx.restore_progress(record, "forcing the VM off");
            host.destroy(&record.vm_uuid)
                .map_err(|e| OpError::Libvirt(format!("cannot stop the VM: {e}")))?;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

fn take_safety_snapshot(
    ctx: &OpContext,
    record: &mut RestoreRecord,
    records: &mut Vec<Arc<SnapshotRecord>>,
) -> OpResult<()> {
    let stamp = now_rfc3339().replace([':', '-'], "");
    let base = format!("pre-restore-{stamp}");
    let mut name = base.clone();
    let mut n = 2;
    while records
        .iter()
        .any(|r| *r.vm_uuid == *record.vm_uuid && r.name == name)
    {
        name = format!("{base}-{n}");
        n += 1;
    }
    ctx.restore_progress(record, format!("taking the safety snapshot {name}"));
    let safety = SnapshotRecord::request(
        name.clone(),
        format!(
            "state before restoring snapshot '{}' (restore {})",
            record.snapshot_name, record.uuid
        ),
        &record.vm_name,
        &record.vm_uuid,
        Vec::new(),
    );
    let done = create::create(ctx, safety, true);
    if done.phase != SnapshotPhase::Succeeded {
        return Err(OpError::Refused(format!(
            "the safety snapshot failed ({}); nothing was restored",
            done.error
        )));
    }
    records.push(Arc::new(done));
    record.safety_snapshot = name;
    ctx.save_restore(record)
}

/// Disks in `current` whose target the snapshot's definition does not have.
/// The snapshot's recorded definition, from its record file when the record does not hold it
/// (the engine keeps records without it, issue 13).
fn recorded_definition(ctx: &OpContext, snapshot: &SnapshotRecord) -> OpResult<String> {
    ctx.store.domain_xml(snapshot).map_err(|e| {
        OpError::Storage(format!(
            "cannot read the definition recorded with snapshot '{}': {e}",
            snapshot.name
        ))
    })
}

fn detached_disks(current: &str, snapshot_xml: &str) -> OpResult<Vec<DetachedDisk>> {
    let now = parse_domain(current, VmState::Unknown, &SysfsLvmProbe).map_err(OpError::Refused)?;
    let then =
        parse_domain(snapshot_xml, VmState::Unknown, &SysfsLvmProbe).map_err(OpError::Refused)?;
    Ok(now
        .disks
        .iter()
        .filter(|d| !then.disks.iter().any(|t| t.target == d.target))
        .map(|d| DetachedDisk {
            target: d.target.clone(),
            source: d.source.clone(),
        })
        .collect())
}

/// Past the point of no return: finishes the in-place volumes from the step each had begun,
/// defines the VM and finishes.
fn finish_committed(
    env: &Env,
    record: &mut RestoreRecord,
    records: &[Arc<SnapshotRecord>],
    snapshot: Option<Arc<SnapshotRecord>>,
    previous_xml: &str,
    volume_steps: &BTreeMap<String, String>,
) -> OpResult<()> {
    let ctx = env.ctx;
    let snapshot = snapshot.ok_or_else(|| {
        OpError::Refused(
            "the restore cannot be finished: its snapshot's record is gone".to_string(),
        )
    })?;
    for volume in &snapshot.volumes {
        let backend = ctx.backends.for_volume(volume)?;
        if !backend.restores_in_place(volume) {
            continue;
        }
        let last = volume_steps.get(&volume.target).map(String::as_str);
        if last == Some(STEP_DONE) {
            continue;
        }
        info!(
            vm = %record.vm_name,
            disk = %volume.target,
            step = last.unwrap_or("none"),
            "finishing the interrupted in-place restore of a volume"
        );
        backend.finish_in_place(env, volume, last)?;
        set_volume_step(record, &volume.target, STEP_DONE);
        ctx.save_restore(record)?;
    }
    define_restored(env, record, &snapshot)?;
    record.error = String::new();
    record.error_name = String::new();
    finish(env, record, records, previous_xml)
}

/// Settles a restore a previous vmsnapd left unfinished: finishes it if the new definition is
/// in place (or it was past its point of no return), else puts the VM back as it was.
pub fn recover(ctx: &OpContext, mut record: RestoreRecord, records: Vec<Arc<SnapshotRecord>>) {
    match recover_steps(ctx, &mut record, &records) {
        Ok(how) => info!(vm = %record.vm_name, "interrupted restore {how}"),
        Err(error) => {
            record.phase = RestorePhase::Failed;
            record.error = vmsnap_api::record_error(&error.to_string());
            record.error_name = error.error_name();
            record.step = RestoreStep::Done;
            ctx.save_restore_failed(&mut record);
        }
    }
}

fn recover_steps(
    ctx: &OpContext,
    record: &mut RestoreRecord,
    records: &[Arc<SnapshotRecord>],
) -> OpResult<&'static str> {
    let host = ctx.hypervisor.session()?;
    let env = Env::new(ctx, host.as_ref());
    let snapshot = records
        .iter()
        .find(|s| s.uuid == record.snapshot_uuid)
        .cloned();
    let previous_xml = match &record.step {
        RestoreStep::Applying { previous_xml } => previous_xml.clone(),
        RestoreStep::Committed {
            previous_xml,
            volume_steps,
        } => {
            let (previous_xml, volume_steps) = (previous_xml.clone(), volume_steps.clone());
            finish_committed(
                &env,
                record,
                records,
                snapshot,
                &previous_xml,
                &volume_steps,
            )?;
            return Ok("finished");
        }
        RestoreStep::Planned => {
            return Err(OpError::Refused(
                "vmsnapd stopped before the restore changed anything; the VM is as it was"
                    .to_string(),
            ))
        }
        RestoreStep::Done => return Ok("settled"),
    };
    // Not committed: the restore is done if the definition uses every new image it made
    // (in-place restores of data make none), otherwise it is undone.
    let made: Vec<&VolumeRestore> = match &snapshot {
        Some(snapshot) => planned(record, snapshot)
            .filter(|(restore, volume)| {
                ctx.backends
                    .for_volume(volume)
                    .is_ok_and(|b| b.restored_source(record.new_vm, volume, restore).is_some())
            })
            .map(|(restore, _)| restore)
            .collect(),
        None => record.restores.iter().collect(),
    };
    let defined = if record.new_vm {
        host.lookup_name(&record.target_name).ok().flatten()
    } else {
        Some(record.vm_uuid.clone())
    };
    let in_place = defined
        .and_then(|uuid| host.public_definition(&uuid).ok().map(|x| (uuid, x)))
        .filter(|(_, xml)| !made.is_empty() && made.iter().all(|r| xml.contains(&r.to_image)));
    match in_place {
        Some((uuid, _)) => {
            record.target_uuid = uuid;
            finish(&env, record, records, &previous_xml)?;
            Ok("finished")
        }
        None => {
            match &snapshot {
                Some(snapshot) => roll_back(&env, record, snapshot, &previous_xml),
                None => {
                    warn!(vm = %record.vm_name, "the snapshot's record is gone: what the restore made stays")
                }
            }
            Err(OpError::Refused(
                "vmsnapd stopped before the restore was complete; the VM was left as it was"
                    .to_string(),
            ))
        }
    }
}
