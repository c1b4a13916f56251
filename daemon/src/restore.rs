//! Restore: a VM back to one of its snapshots, in place or as a new VM. Runs on an operation
//! thread like the snapshot operations, with the restore record as its journal.
//!
//! The snapshot's images are never written: the restored VM gets a fresh qcow2 overlay on each
//! (so the cost does not grow with the disk size), and the snapshot stays restorable and
//! deletable. In place, the definition comes back from the content record (same name and
//! UUID); disks attached since are detached (their images left alone) and listed.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use virt::connect::Connect;
use virt::domain::Domain;
use vmsnap_api::{DetachedDisk, RestorePhase, SnapshotPhase, VmState, VolumeRestore};

use crate::disks::SysfsLvmProbe;
use crate::domain::{self, parse_domain};
use crate::files;
use crate::images::prune_unclaimed;
use crate::lvm_volumes;
use crate::qemu_img;
use crate::snapshot::{
    self, connect, crash_point, is_active, lookup, now_rfc3339, OpContext, OpEvent,
    VIR_DOMAIN_XML_INACTIVE, VIR_DOMAIN_XML_SECURE,
};
use crate::store::{RestoreRecord, RestoreStep, SnapshotRecord, Step, RECORD_VERSION};

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

/// Suffix of a NVRAM copy waiting to be renamed into place.
const PENDING: &str = ".vmsnap-restore";

impl OpContext {
    fn restore_progress(&self, record: &RestoreRecord, text: impl Into<String>) {
        let text = text.into();
        if !text.is_empty() {
            info!(vm = %record.vm_name, snapshot = %record.snapshot_name, "{text}");
        }
        let _ = self.events.send(OpEvent::RestoreProgress {
            uuid: record.uuid.clone(),
            text,
        });
    }

    /// As [`OpContext::save_failed`], for a restore.
    fn save_restore_failed(&self, record: &mut RestoreRecord) {
        if let Err(e) = self.save_restore(record) {
            warn!(vm = %record.vm_name, error = %e, "the failed restore's record is not on disk");
            record.error = vmsnap_api::record_error(&format!(
                "{}; {e} (vmsnapd settles it again at its next start)",
                record.error
            ));
            let _ = self
                .events
                .send(OpEvent::RestoreSaved(Box::new(record.clone())));
        }
    }

    fn save_restore(&self, record: &RestoreRecord) -> Result<(), String> {
        self.store
            .save_restore(record)
            .map_err(|e| format!("cannot write the restore record: {e}"))?;
        let _ = self
            .events
            .send(OpEvent::RestoreSaved(Box::new(record.clone())));
        Ok(())
    }
}

/// Runs the restore `record` describes. `records` are every snapshot record (for the safety
/// snapshot's name and for pruning images nothing claims any more).
pub fn restore(
    ctx: &OpContext,
    mut record: RestoreRecord,
    snapshot: SnapshotRecord,
    mut records: Vec<SnapshotRecord>,
) {
    let mut stopped = false;
    if let Err(mut error) = restore_steps(ctx, &mut record, &snapshot, &mut records, &mut stopped) {
        warn!(vm = %record.vm_name, snapshot = %record.snapshot_name, %error, "restore failed");
        // Past the point of no return the journal stays, so the next start finishes it.
        let forward_pending = matches!(
            &record.step,
            RestoreStep::Committed { lvm_steps, .. } if !lvm_steps.is_empty()
        );
        if stopped && !forward_pending {
            // Nothing changed: the VM this restore shut down runs again.
            let started = connect(&ctx.uri)
                .and_then(|conn| lookup(&conn, &record.vm_uuid))
                .and_then(|dom| dom.create().map_err(|e| e.message().to_string()));
            match started {
                Ok(_) => error.push_str("; the VM was started again"),
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
    records: &mut Vec<SnapshotRecord>,
    stopped: &mut bool,
) -> Result<(), String> {
    let policy_waits = matches!(
        record.readiness_policy.as_str(),
        "WaitGracePeriod" | "WaitEventually"
    );
    if !record.new_vm && policy_waits {
        // Before the connection the rest uses: the wait outlives libvirtd restarts.
        waiting().insert(record.uuid.clone(), false);
        let waited = wait_until_shut_off(ctx, record);
        // Leaving the map decides: deleted before this point means cancelled.
        let deleted = waiting().remove(&record.uuid).unwrap_or(false);
        waited?;
        if deleted {
            return Err(DELETED_WHILE_WAITING.to_string());
        }
    }
    let conn = connect(&ctx.uri)?;
    if snapshot.phase != SnapshotPhase::Succeeded || !snapshot.ready_to_use {
        return Err(format!(
            "snapshot '{}' is {}, not ready to restore",
            snapshot.name,
            snapshot.phase.as_str()
        ));
    }
    if let Some(missing) = snapshot
        .volumes
        .iter()
        .find(|v| !Path::new(&v.image).exists())
    {
        return Err(format!(
            "snapshot '{}' cannot be restored: its image {} of disk {} is missing",
            snapshot.name, missing.image, missing.target
        ));
    }

    let lvm = ctx.lvm_tool();
    for volume in snapshot.volumes.iter().filter(|v| v.lvm.is_some()) {
        lvm_volumes::check_restorable(&lvm, &snapshot.uuid, volume)?;
    }
    if record.new_vm {
        lvm_volumes::check_new_vm(&snapshot.volumes)?;
    }

    let mut previous_xml = String::new();
    let mut detached = Vec::new();
    if !record.new_vm {
        let dom = lookup(&conn, &record.vm_uuid)?;
        if record.phase == RestorePhase::Waiting {
            record.phase = RestorePhase::InProgress;
            ctx.save_restore(record)?;
        }
        if is_active(&dom)? {
            if !record.stop_target {
                return Err(format!("VM '{}' is running; stop it first", record.vm_name));
            }
            shut_down(ctx, record, &dom)?;
            *stopped = true;
        }
        for volume in &snapshot.volumes {
            lvm_volumes::check_in_place(&lvm, volume)?;
        }
        // Named as the user knows them, before a safety snapshot puts overlays on top.
        let original = dom
            .xml_desc(VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| e.message().to_string())?;
        detached = detached_disks(&original, &snapshot.domain_xml)?;
        if record.take_safety_snapshot {
            take_safety_snapshot(ctx, record, records)?;
        }
        previous_xml = dom
            .xml_desc(VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE)
            .map_err(|e| e.message().to_string())?;
    } else if conn.lookup_domain_by_name(&record.target_name).is_ok() {
        return Err(format!(
            "a VM named '{}' already exists",
            record.target_name
        ));
    }

    // Plan: one new overlay per disk, named after the target VM and this restore.
    let short = record.uuid.get(..8).unwrap_or(&record.uuid).to_string();
    record.restores = snapshot
        .volumes
        .iter()
        .map(|v| {
            let to_image = match &v.lvm {
                // In place, the origin LV itself gets the snapshot's data.
                Some(l) if !record.new_vm => format!("/dev/{}/{}", l.vg, l.origin),
                Some(l) => {
                    let name = format!("{}-{}-r{short}", record.target_name, v.target);
                    vmsnap_lvm::validate_lv_name(&name).map_err(|e| e.to_string())?;
                    format!("/dev/{}/{name}", l.vg)
                }
                None => Path::new(&v.image)
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .join(format!(
                        "{}-{}-r{short}.qcow2",
                        record.target_name, v.target
                    ))
                    .to_string_lossy()
                    .into_owned(),
            };
            Ok(VolumeRestore {
                target: v.target.clone(),
                from_image: v.image.clone(),
                to_image,
            })
        })
        .collect::<Result<_, String>>()?;
    record.not_restored = snapshot.excluded.clone();
    record.detached = detached;
    record.step = RestoreStep::Applying {
        previous_xml: previous_xml.clone(),
    };
    ctx.save_restore(record)?;

    let applied = apply(ctx, &conn, record, snapshot, &previous_xml);
    if let Err(error) = applied {
        if let RestoreStep::Committed { lvm_steps, .. } = &record.step {
            if !lvm_steps.is_empty() {
                // LV data was replaced: there is no going back, only forward.
                return Err(format!(
                    "{error}; the VM's LVM disks are partly restored: vmsnapd finishes this restore when it next starts (keep the VM off until then)"
                ));
            }
        }
        roll_back(
            ctx,
            &conn,
            record,
            &previous_xml,
            &staged_nvram(record, snapshot),
        );
        return Err(error);
    }
    finish(ctx, &conn, record, records, &previous_xml)
}

/// Creates the overlays (and a new VM's LVs), stages the NVRAM state, restores the LVM volumes
/// in place (from then on the restore only goes forward), and defines the VM.
fn apply(
    ctx: &OpContext,
    conn: &Connect,
    record: &mut RestoreRecord,
    snapshot: &SnapshotRecord,
    previous_xml: &str,
) -> Result<(), String> {
    ctx.restore_progress(record, "creating the new disk overlays");
    for (restore, volume) in record.restores.iter().zip(&snapshot.volumes) {
        if volume.lvm.is_none() {
            qemu_img::create_overlay(&restore.to_image, &volume.image, &volume.image_format)?;
        }
    }
    for copy in snapshot.extra_state.iter().filter(|c| c.kind == "nvram") {
        let target = nvram_target_path(record, &copy.source);
        let pending = format!("{target}{PENDING}");
        // A pending copy is vmsnapd's own, left by an interrupted attempt: it is made again.
        if let Err(e) = std::fs::remove_file(&pending) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(format!("cannot replace {pending}: {e}"));
            }
        }
        files::copy_file_new(Path::new(&copy.copy), Path::new(&pending))
            .map_err(|e| format!("cannot stage the NVRAM copy for {target}: {e}"))?;
    }
    let lvm = ctx.lvm_tool();
    if record.new_vm {
        for (restore, volume) in record.restores.iter().zip(&snapshot.volumes) {
            if volume.lvm.is_some() {
                let name = restore.to_image.rsplit('/').next().unwrap_or_default();
                lvm_volumes::clone_thin(&lvm, volume, name, &record.uuid)?;
            }
        }
    }
    crash_point("restore-before-define");
    let in_place_lvm = !record.new_vm && snapshot.volumes.iter().any(|v| v.lvm.is_some());
    if in_place_lvm {
        record.step = RestoreStep::Committed {
            previous_xml: previous_xml.to_string(),
            lvm_steps: BTreeMap::new(),
        };
        ctx.save_restore(record)?;
        for volume in snapshot.volumes.iter().filter(|v| v.lvm.is_some()) {
            ctx.restore_progress(
                record,
                format!("restoring LVM volume of disk {}", volume.target),
            );
            let mut journal_error = None;
            let done = lvm_volumes::restore_in_place(&lvm, volume, |step| {
                set_lvm_step(record, &volume.target, step);
                if let Err(e) = ctx.save_restore(record) {
                    journal_error = Some(e);
                    return ControlFlow::Break(());
                }
                crash_point(&format!("restore-lvm-{step}"));
                ControlFlow::Continue(())
            });
            if let Some(e) = journal_error {
                return Err(e);
            }
            done?;
            set_lvm_step(record, &volume.target, lvm_volumes::STEP_DONE);
            ctx.save_restore(record)?;
        }
    }
    define_restored(ctx, conn, record, snapshot)
}

fn set_lvm_step(record: &mut RestoreRecord, target: &str, step: &str) {
    if let RestoreStep::Committed { lvm_steps, .. } = &mut record.step {
        lvm_steps.insert(target.to_string(), step.to_string());
    }
}

/// Defines the restored VM: the snapshot's definition on the restored disks (and, for a new
/// VM, a new identity). Deterministic, so recovery can define it again.
fn define_restored(
    ctx: &OpContext,
    conn: &Connect,
    record: &mut RestoreRecord,
    snapshot: &SnapshotRecord,
) -> Result<(), String> {
    let mut xml = snapshot.domain_xml.clone();
    for (restore, volume) in record.restores.iter().zip(&snapshot.volumes) {
        match &volume.lvm {
            None => {
                xml = domain::set_disk_source(&xml, &restore.target, &restore.to_image, "qcow2")?
            }
            Some(_) if record.new_vm => {
                xml = domain::set_disk_source(&xml, &restore.target, &restore.to_image, "raw")?
            }
            Some(_) => {}
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
        )?;
    }
    ctx.restore_progress(record, "defining the VM");
    let dom = conn
        .define_domain_xml(&xml)
        .map_err(|e| format!("libvirt refused the restored definition: {}", e.message()))?;
    record.target_uuid = dom.uuid_string().map_err(|e| e.message().to_string())?;
    crash_point("restore-after-define");
    Ok(())
}

/// After the definition is in place: NVRAM and TPM state into place, images nothing claims any
/// more removed, the VM started if asked.
fn finish(
    ctx: &OpContext,
    conn: &Connect,
    record: &mut RestoreRecord,
    records: &[SnapshotRecord],
    previous_xml: &str,
) -> Result<(), String> {
    let snapshot = records
        .iter()
        .find(|s| s.uuid == record.snapshot_uuid)
        .cloned();
    if let Some(snapshot) = &snapshot {
        for copy in &snapshot.extra_state {
            match copy.kind.as_str() {
                "nvram" => {
                    let target = nvram_target_path(record, &copy.source);
                    let pending = format!("{target}{PENDING}");
                    if Path::new(&pending).exists() {
                        std::fs::rename(&pending, &target)
                            .map_err(|e| format!("cannot put the NVRAM back at {target}: {e}"))?;
                    }
                }
                "tpm" => {
                    let uuid = if record.new_vm {
                        &record.target_uuid
                    } else {
                        &record.vm_uuid
                    };
                    let target = format!("/var/lib/libvirt/swtpm/{uuid}");
                    let _ = std::fs::remove_dir_all(&target);
                    files::copy_dir_new(Path::new(&copy.copy), Path::new(&target))
                        .map_err(|e| format!("cannot put the TPM state back: {e}"))?;
                }
                _ => {}
            }
        }
    }
    if record.new_vm {
        let lvm = ctx.lvm_tool();
        for restore in &record.restores {
            if vmsnap_lvm::is_lvm_path(Path::new(&restore.to_image)) {
                lvm_volumes::keep_clone(&lvm, &restore.to_image, &record.uuid)?;
            }
        }
    }
    // The images the VM used before (in place) are the old branch: keep what a snapshot
    // claims, remove what nothing needs.
    if !previous_xml.is_empty() {
        let vm = parse_domain(previous_xml, VmState::Unknown, &SysfsLvmProbe)?;
        for disk in vm.disks.iter().filter(|d| d.backend == "qcow2") {
            if let Ok((top, _)) = domain::disk_source(previous_xml, &disk.target) {
                prune_unclaimed(conn, records, &top)?;
            }
        }
    }
    info!(vm = %record.vm_name, snapshot = %record.snapshot_name, target = %record.target_name, "restored");
    if record.start {
        ctx.restore_progress(record, "starting the VM");
        let started = conn
            .lookup_domain_by_uuid_string(&record.target_uuid)
            .and_then(|d| d.create().map(|_| ()));
        if let Err(e) = started {
            // The restore itself is done and stays so; the start is reported beside it.
            record.error = format!("restored, but the VM did not start: {}", e.message());
        }
    }
    record.phase = RestorePhase::Succeeded;
    record.complete = true;
    record.restore_time = now_rfc3339();
    record.step = RestoreStep::Done;
    ctx.save_restore(record)?;
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

/// Undoes `apply`: back to the previous definition, new overlays and staged copies removed.
fn roll_back(
    ctx: &OpContext,
    conn: &Connect,
    record: &RestoreRecord,
    previous_xml: &str,
    staged: &[String],
) {
    if record.new_vm {
        if let Ok(dom) = conn.lookup_domain_by_name(&record.target_name) {
            let uses_ours = dom
                .xml_desc(VIR_DOMAIN_XML_INACTIVE)
                .map(|xml| record.restores.iter().any(|r| xml.contains(&r.to_image)))
                .unwrap_or(false);
            if uses_ours {
                let _ = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM);
            }
        }
    } else if !previous_xml.is_empty() {
        if let Err(e) = conn.define_domain_xml(previous_xml) {
            warn!(error = %e.message(), "cannot put the previous definition back");
        }
    }
    let lvm = ctx.lvm_tool();
    for restore in &record.restores {
        if vmsnap_lvm::is_lvm_path(Path::new(&restore.to_image)) {
            // Only a new VM's clones, which carry this restore's tag; an origin LV never.
            if let Err(e) = lvm_volumes::remove_clone(&lvm, &restore.to_image, &record.uuid) {
                warn!(lv = %restore.to_image, error = %e, "cannot remove a restore's LV");
            }
        } else {
            let _ = std::fs::remove_file(&restore.to_image);
        }
    }
    for pending in staged {
        let _ = std::fs::remove_file(pending);
    }
}

/// Whether the VM runs, on a connection kept across calls and opened again when libvirt went
/// away (libvirtd restarted): `None` while libvirt cannot be reached. A VM that no longer
/// exists is an error.
fn vm_active(
    ctx: &OpContext,
    record: &RestoreRecord,
    session: &mut Option<(Connect, Domain)>,
) -> Result<Option<bool>, String> {
    if let Some((_, dom)) = session.as_ref() {
        if let Ok(active) = dom.is_active() {
            return Ok(Some(active));
        }
    }
    *session = None;
    let Ok(conn) = connect(&ctx.uri) else {
        return Ok(None);
    };
    match conn.lookup_domain_by_uuid_string(&record.vm_uuid) {
        Ok(dom) => {
            let active = dom.is_active().ok();
            *session = Some((conn, dom));
            Ok(active)
        }
        Err(e)
            if matches!(
                e.code(),
                virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)
            ) =>
        {
            Err(format!(
                "VM '{}' was undefined while the restore waited for it to be shut off",
                record.vm_name
            ))
        }
        Err(_) => Ok(None),
    }
}

/// targetReadinessPolicy WaitGracePeriod and WaitEventually: the restore waits in phase Waiting
/// until libvirt reports the VM shut off (by its user or the guest), up to
/// `restore_grace_period` for WaitGracePeriod. Nothing has changed while it waits, so giving
/// up leaves the VM as it was. A libvirtd restart meanwhile is waited out.
fn wait_until_shut_off(ctx: &OpContext, record: &mut RestoreRecord) -> Result<(), String> {
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
            return Err(DELETED_WHILE_WAITING.to_string());
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
            return Err(format!(
                "vmsnapd stopped while the restore waited for VM '{}' to be shut off; nothing \
                 was changed",
                record.vm_name
            ));
        }
        if !eventually && Instant::now() >= deadline {
            return Err(format!(
                "VM '{}' was not shut off within the grace period ({grace_text}, \
                 targetReadinessPolicy WaitGracePeriod); nothing was changed",
                record.vm_name
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn shut_down(ctx: &OpContext, record: &RestoreRecord, dom: &Domain) -> Result<(), String> {
    ctx.restore_progress(record, "shutting the VM down");
    let _ = dom.shutdown();
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while is_active(dom)? {
        if Instant::now() > deadline {
            ctx.restore_progress(record, "forcing the VM off");
            dom.destroy()
                .map_err(|e| format!("cannot stop the VM: {}", e.message()))?;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

fn take_safety_snapshot(
    ctx: &OpContext,
    record: &mut RestoreRecord,
    records: &mut Vec<SnapshotRecord>,
) -> Result<(), String> {
    let stamp = now_rfc3339().replace([':', '-'], "");
    let base = format!("pre-restore-{stamp}");
    let mut name = base.clone();
    let mut n = 2;
    while records
        .iter()
        .any(|r| r.vm_uuid == record.vm_uuid && r.name == name)
    {
        name = format!("{base}-{n}");
        n += 1;
    }
    ctx.restore_progress(record, format!("taking the safety snapshot {name}"));
    let safety = SnapshotRecord {
        version: RECORD_VERSION,
        uuid: uuid::Uuid::new_v4().to_string(),
        name: name.clone(),
        description: format!(
            "state before restoring snapshot '{}' (restore {})",
            record.snapshot_name, record.uuid
        ),
        vm_name: record.vm_name.clone(),
        vm_uuid: record.vm_uuid.clone(),
        phase: SnapshotPhase::InProgress,
        ready_to_use: false,
        creation_time: now_rfc3339(),
        indications: Vec::new(),
        error: String::new(),
        freeze_duration_ms: 0,
        frozen_filesystems: 0,
        step: Step::Planned,
        domain_xml: String::new(),
        volumes: Vec::new(),
        excluded: Vec::new(),
        extra_state: Vec::new(),
        cow_fill_percent: 0.0,
        source_indications: Vec::new(),
    };
    let done = snapshot::create(ctx, safety, true);
    if done.phase != SnapshotPhase::Succeeded {
        return Err(format!(
            "the safety snapshot failed ({}); nothing was restored",
            done.error
        ));
    }
    records.push(done);
    record.safety_snapshot = name;
    ctx.save_restore(record)
}

/// Disks in `current` whose target the snapshot's definition does not have.
fn detached_disks(current: &str, snapshot_xml: &str) -> Result<Vec<DetachedDisk>, String> {
    let now = parse_domain(current, VmState::Unknown, &SysfsLvmProbe)?;
    let then = parse_domain(snapshot_xml, VmState::Unknown, &SysfsLvmProbe)?;
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

/// Settles a restore a previous vmsnapd left unfinished: finishes it if the new definition is
/// in place, else puts the VM back as it was.
pub fn recover(ctx: &OpContext, mut record: RestoreRecord, records: Vec<SnapshotRecord>) {
    let result = (|| -> Result<&'static str, String> {
        let conn = connect(&ctx.uri)?;
        let snapshot = records
            .iter()
            .find(|s| s.uuid == record.snapshot_uuid)
            .cloned();
        let previous_xml = match &record.step {
            RestoreStep::Applying { previous_xml } => previous_xml.clone(),
            RestoreStep::Committed {
                previous_xml,
                lvm_steps,
            } => {
                // Past the point of no return: finish the LVM volumes, define, finish.
                let previous_xml = previous_xml.clone();
                let lvm_steps = lvm_steps.clone();
                let snapshot = snapshot.ok_or_else(|| {
                    "the restore cannot be finished: its snapshot's record is gone".to_string()
                })?;
                let lvm = ctx.lvm_tool();
                for volume in snapshot.volumes.iter().filter(|v| v.lvm.is_some()) {
                    let last = lvm_steps.get(&volume.target).map(String::as_str);
                    info!(
                        vm = %record.vm_name,
                        disk = %volume.target,
                        step = last.unwrap_or("none"),
                        "finishing the interrupted restore of an LVM volume"
                    );
                    lvm_volumes::finish_in_place(&lvm, volume, last)?;
                    set_lvm_step(&mut record, &volume.target, lvm_volumes::STEP_DONE);
                    ctx.save_restore(&record)?;
                }
                define_restored(ctx, &conn, &mut record, &snapshot)?;
                record.error = String::new();
                finish(ctx, &conn, &mut record, &records, &previous_xml)?;
                return Ok("finished");
            }
            RestoreStep::Planned => {
                return Err(
                    "vmsnapd stopped before the restore changed anything; the VM is as it was"
                        .to_string(),
                )
            }
            RestoreStep::Done => return Ok("settled"),
        };
        // Not committed: the restore is done if the definition uses every new image it
        // made (in-place LVM volumes make none), otherwise it is undone.
        let made: Vec<&VolumeRestore> = record
            .restores
            .iter()
            .filter(|r| {
                record.new_vm
                    || snapshot.as_ref().is_none_or(|s| {
                        s.volumes
                            .iter()
                            .any(|v| v.target == r.target && v.lvm.is_none())
                    })
            })
            .collect();
        let defined = if record.new_vm {
            conn.lookup_domain_by_name(&record.target_name).ok()
        } else {
            conn.lookup_domain_by_uuid_string(&record.vm_uuid).ok()
        };
        let in_place = defined
            .and_then(|d| d.xml_desc(VIR_DOMAIN_XML_INACTIVE).ok().map(|x| (d, x)))
            .filter(|(_, xml)| !made.is_empty() && made.iter().all(|r| xml.contains(&r.to_image)));
        match in_place {
            Some((dom, _)) => {
                record.target_uuid = dom.uuid_string().map_err(|e| e.message().to_string())?;
                finish(ctx, &conn, &mut record, &records, &previous_xml)?;
                Ok("finished")
            }
            None => {
                let staged = snapshot
                    .as_ref()
                    .map(|s| staged_nvram(&record, s))
                    .unwrap_or_default();
                roll_back(ctx, &conn, &record, &previous_xml, &staged);
                Err(
                    "vmsnapd stopped before the restore was complete; the VM was left as it was"
                        .to_string(),
                )
            }
        }
    })();
    match result {
        Ok(how) => info!(vm = %record.vm_name, "interrupted restore {how}"),
        Err(error) => {
            record.phase = RestorePhase::Failed;
            record.error = vmsnap_api::record_error(&error);
            record.step = RestoreStep::Done;
            ctx.save_restore_failed(&mut record);
        }
    }
}
