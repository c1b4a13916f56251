//! Snapshot operations: create, delete and recovery of qcow2 snapshots. Each runs on a thread of
//! its own with its own libvirt connection (a libvirt thread: nothing here runs on tokio), writes
//! the record before every step that changes anything (the record is the journal), and reports
//! progress and saved records to the engine.
//!
//! How the images relate: taking snapshot S of a disk whose top image is I creates a new overlay
//! O on top of I; the VM writes to O from then on, and I, now read-only, is S's image. So the
//! images of a VM's snapshots and the live disk form one backing chain, oldest first. Deleting S
//! merges the image directly above I (S's overlay) down into I: the merge costs only the data
//! written between S and the next snapshot (or now), and every other snapshot keeps its content.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use vmsnap_api::{DiskBackend, ExcludedVolume, Indication, SnapshotPhase};

use crate::config::{LvmConfig, Quiesce};
use crate::disks::SysfsLvmProbe;
use crate::domain::{self, parse_domain};
use crate::files;
use crate::images::{is_owned, prune_unclaimed, Forest};
use crate::lvm_volumes;
use crate::qemu_img;
use crate::store::{SnapshotRecord, StateCopy, Step, Store, VolumeRecord};
use crate::thaw_guard::ThawGuard;
use crate::virt_ext;

/// What an operation tells the engine.
#[derive(Debug)]
pub enum OpEvent {
    Progress {
        uuid: String,
        text: String,
    },
    RestoreProgress {
        uuid: String,
        text: String,
    },
    /// A restore record was saved.
    RestoreSaved(Box<crate::store::RestoreRecord>),
    /// A record was saved; the engine's copy must follow.
    Saved(Box<SnapshotRecord>),
    /// A record was removed (the snapshot is deleted).
    Removed {
        uuid: String,
    },
    /// The operation on this VM is over; the VM takes new work.
    Finished {
        vm_uuid: String,
    },
    /// A check of the thick LVM snapshots' copy-on-write space ended.
    CowFill(Result<Vec<crate::lvm_volumes::CowFill>, String>),
}

/// Everything an operation needs, owned, so it can move to its thread.
#[derive(Clone)]
pub struct OpContext {
    pub uri: String,
    pub store: Store,
    pub freeze_timeout: Duration,
    pub require_quiesce: bool,
    pub failure_deadline: Duration,
    /// How long a WaitGracePeriod restore waits for its VM to be shut off.
    pub restore_grace_period: Duration,
    pub quiesce: Quiesce,
    pub lvm: LvmConfig,
    pub events: UnboundedSender<OpEvent>,
}

pub(crate) const VIR_DOMAIN_XML_SECURE: u32 = 1;
pub(crate) const VIR_DOMAIN_XML_INACTIVE: u32 = 2;
/// REUSE_EXT: the overlays are made before the freeze, so creating them is not part of the
/// frozen window.
const SNAPSHOT_FLAGS: u32 = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT;

impl OpContext {
    fn progress(&self, record: &SnapshotRecord, text: impl Into<String>) {
        let text = text.into();
        if !text.is_empty() {
            info!(vm = %record.vm_name, snapshot = %record.name, "{text}");
        }
        let _ = self.events.send(OpEvent::Progress {
            uuid: record.uuid.clone(),
            text,
        });
    }

    /// Saves a record, then tells the engine. A record that cannot be saved stops the operation:
    /// going on without the journal would break the crash-safety promise.
    fn save(&self, record: &SnapshotRecord) -> Result<(), String> {
        self.store
            .save(record)
            .map_err(|e| format!("cannot write the snapshot record: {e}"))?;
        let _ = self.events.send(OpEvent::Saved(Box::new(record.clone())));
        Ok(())
    }

    /// Saves the record that ends a failed operation. Should even that fail (a full or failing
    /// state folder), the engine and the bus still learn that it failed, with a note that the
    /// record on disk is behind: the next start settles it from the journal.
    fn save_failed(&self, record: &mut SnapshotRecord) {
        if let Err(e) = self.save(record) {
            warn!(vm = %record.vm_name, snapshot = %record.name, error = %e, "the failed snapshot's record is not on disk");
            record.error = vmsnap_api::record_error(&format!(
                "{}; {e} (vmsnapd settles it again at its next start)",
                record.error
            ));
            let _ = self.events.send(OpEvent::Saved(Box::new(record.clone())));
        }
    }

    pub(crate) fn lvm_tool(&self) -> vmsnap_lvm::Lvm {
        lvm_volumes::tool(&self.lvm)
    }

    fn finished(&self, vm_uuid: &str) {
        let _ = self.events.send(OpEvent::Finished {
            vm_uuid: vm_uuid.to_string(),
        });
    }

    /// Starts `work` on a new libvirt thread; the VM is released when it ends.
    pub fn spawn(self, vm_uuid: String, work: impl FnOnce(&OpContext) + Send + 'static) {
        let ctx = self.clone();
        let released = vm_uuid.clone();
        let spawned = std::thread::Builder::new()
            .name("libvirt-op".to_string())
            .spawn(move || {
                work(&ctx);
                ctx.finished(&released);
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start an operation thread");
            self.finished(&vm_uuid);
        }
    }
}

pub(crate) fn connect(uri: &str) -> Result<Connect, String> {
    crate::libvirt::open(uri).map_err(|e| format!("cannot connect to libvirt: {}", e.message()))
}

pub(crate) fn lookup(conn: &Connect, uuid: &str) -> Result<Domain, String> {
    conn.lookup_domain_by_uuid_string(uuid)
        .map_err(|e| format!("VM {uuid}: {}", e.message()))
}

pub(crate) fn is_active(dom: &Domain) -> Result<bool, String> {
    dom.is_active().map_err(|e| e.message().to_string())
}

/// The XML that shows the disks as QEMU uses them: live while running, inactive otherwise.
fn current_xml(dom: &Domain) -> Result<String, String> {
    let flags = if is_active(dom)? {
        0
    } else {
        VIR_DOMAIN_XML_INACTIVE
    };
    dom.xml_desc(flags).map_err(|e| e.message().to_string())
}

/// RFC 3339 UTC time, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Create

/// Takes the snapshot `record` describes (phase InProgress, step Planned, no volumes yet).
/// Returns the record as it ended.
pub fn create(ctx: &OpContext, mut record: SnapshotRecord, allow_excluded: bool) -> SnapshotRecord {
    let deadline = Instant::now() + ctx.failure_deadline;
    if let Err(error) = create_steps(ctx, &mut record, allow_excluded, deadline) {
        warn!(vm = %record.vm_name, snapshot = %record.name, %error, "snapshot failed");
        remove_unused_overlays(ctx, &record);
        record.phase = SnapshotPhase::Failed;
        record.ready_to_use = false;
        record.error = vmsnap_api::record_error(&error);
        record.step = Step::Done;
        ctx.save_failed(&mut record);
    }
    record
}

fn create_steps(
    ctx: &OpContext,
    record: &mut SnapshotRecord,
    allow_excluded: bool,
    deadline: Instant,
) -> Result<(), String> {
    let conn = connect(&ctx.uri)?;
    let dom = lookup(&conn, &record.vm_uuid)?;
    ctx.progress(record, "reading the VM definition");
    let state = match dom.info().map_err(|e| e.message().to_string())?.state {
        virt::enumutil::Enum::Known(s) => s,
        virt::enumutil::Enum::Unknown(_) => return Err("the VM is in an unknown state".into()),
    };
    let inactive_xml = dom
        .xml_desc(VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE)
        .map_err(|e| e.message().to_string())?;
    let live_xml = current_xml(&dom)?;
    let vm = parse_domain(&live_xml, vmsnap_api::VmState::Unknown, &SysfsLvmProbe)?;

    let mut volumes = Vec::new();
    let mut excluded = Vec::new();
    let short = record.uuid.get(..8).unwrap_or(&record.uuid).to_string();
    for disk in &vm.disks {
        match disk.backend.as_str() {
            b if b == DiskBackend::Qcow2.as_str() => {
                let (image, format) = domain::disk_source(&live_xml, &disk.target)?;
                let dir = Path::new(&image)
                    .parent()
                    .ok_or_else(|| format!("disk {}: {image} has no directory", disk.target))?;
                let overlay = dir
                    .join(format!("{}-{}-{short}.qcow2", record.vm_name, disk.target))
                    .to_string_lossy()
                    .into_owned();
                if files::path_taken(Path::new(&overlay)) {
                    return Err(format!("disk {}: {overlay} already exists", disk.target));
                }
                let virtual_size = dom
                    .block_info(&disk.target, 0)
                    .map_err(|e| format!("disk {}: {}", disk.target, e.message()))?
                    .capacity;
                volumes.push(VolumeRecord {
                    target: disk.target.clone(),
                    backend: disk.backend.clone(),
                    image,
                    image_format: format,
                    overlay,
                    virtual_size,
                    lvm: None,
                });
            }
            b if b == DiskBackend::Lvm.as_str() => volumes.push(lvm_volumes::plan(
                &ctx.lvm_tool(),
                &ctx.lvm,
                &disk.target,
                &disk.source,
                &record.vm_uuid,
                &record.uuid,
            )?),
            _ => excluded.push(ExcludedVolume {
                target: disk.target.clone(),
                reason: disk.reason.clone(),
            }),
        }
    }
    if !excluded.is_empty() && !allow_excluded {
        return Err(excluded_message(&excluded));
    }
    // A VM with no disk to capture (only a cdrom, say) gets a snapshot of its definition
    // alone, with zero volumes, as KubeVirt's does.
    let extra = domain::extra_state(&inactive_xml, &record.vm_uuid)?;
    let copy_dir = ctx.store.state_copy_dir(&record.vm_uuid, &record.uuid);
    record.extra_state = extra
        .iter()
        .map(|e| StateCopy {
            kind: e.kind.to_string(),
            source: e.path.clone(),
            copy: copy_dir.join(e.kind).to_string_lossy().into_owned(),
        })
        .collect();
    record.domain_xml = inactive_xml;
    record.volumes = volumes;
    record.excluded = excluded;
    record.step = Step::Planned;
    ctx.save(record)?;

    let running = state == DomainState::Running;
    let paused = state == DomainState::Paused;
    let online = is_active(&dom)?;
    let try_freeze = running
        && !record.volumes.is_empty()
        && match ctx.quiesce {
            Quiesce::Auto => vm.agent == vmsnap_api::AgentState::Connected,
            Quiesce::Always => vm.agent != vmsnap_api::AgentState::NotConfigured,
        };
    record.indications = Vec::new();
    if online {
        record.indications.push(Indication::Online);
    }
    // Why each indication was given, for sourceIndications.
    let mut notes: Vec<(Indication, String)> = Vec::new();
    if paused {
        record.indications.push(Indication::Paused);
    } else if running && !try_freeze && !record.volumes.is_empty() {
        record.indications.push(Indication::NoGuestAgent);
        notes.push((
            Indication::NoGuestAgent,
            format!(
                "the guest agent is {}: the snapshot is crash-consistent",
                vm.agent.as_str().replace('-', " ")
            ),
        ));
    }
    if !record.excluded.is_empty() {
        record.indications.push(Indication::PartialSnapshot);
    }

    check_deadline(deadline)?;
    for volume in record.volumes.iter().filter(|v| v.lvm.is_none()) {
        qemu_img::create_overlay_unopened(
            &volume.overlay,
            &volume.image,
            &volume.image_format,
            volume.virtual_size,
        )
        .map_err(|e| format!("disk {}: cannot create the overlay: {e}", volume.target))?;
    }
    let mut freeze: Option<(ThawGuard, Instant)> = None;
    if try_freeze {
        let guard = ThawGuard::arm(&ctx.uri, &record.vm_uuid, ctx.freeze_timeout)
            .map_err(|e| format!("cannot start the thaw guard: {e}"))?;
        record.step = Step::Freezing;
        ctx.save(record)?;
        ctx.progress(record, "freezing the guest's filesystems");
        // Bound the freeze call itself: half the freeze deadline, so a freeze that does not
        // answer in time fails (QuiesceFailed) with time left to snapshot and thaw.
        let answer_within = (ctx.freeze_timeout.as_secs() / 2).clamp(1, 60) as i32;
        if let Err(e) = virt_ext::agent_set_response_timeout(&dom, answer_within) {
            // Drivers without it (test:///) are expected; anything else is worth a warning.
            if matches!(
                e.code(),
                virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoSupport)
            ) {
                tracing::debug!(error = %e.message(), "cannot bound the agent's response time");
            } else {
                warn!(error = %e.message(), "cannot bound the agent's response time");
            }
        }
        let started = Instant::now();
        let frozen = virt_ext::fs_freeze(&dom);
        // Back to libvirt's default for everyone else who uses this agent.
        let _ = virt_ext::agent_set_response_timeout(
            &dom,
            virt::sys::VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT,
        );
        match frozen {
            Ok(count) => {
                record.frozen_filesystems = count;
                record.indications.push(Indication::GuestAgent);
                freeze = Some((guard, started));
            }
            Err(e) => {
                // libvirt sends the freeze only after the agent answered a sync, so a failed
                // freeze normally froze nothing; thaw anyway in case the agent froze late, and
                // leave it to the guard (by dropping it armed) if even that fails.
                match virt_ext::fs_thaw(&dom) {
                    Ok(_) => {
                        let _ = guard.disarm();
                    }
                    Err(_) => drop(guard),
                }
                if ctx.require_quiesce {
                    return Err(format!(
                        "the guest's filesystems could not be frozen ({}); require_quiesce is set, \
                         so no snapshot was taken",
                        e.message()
                    ));
                }
                warn!(vm = %record.vm_name, error = %e.message(), "freeze failed; taking a crash-consistent snapshot");
                let timed_out = matches!(
                    e.code(),
                    virt::enumutil::Enum::Known(virt::error::ErrorNumber::AgentUnresponsive)
                );
                let (indication, what) = if timed_out {
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
                    format!("{what} ({}): the snapshot is crash-consistent", e.message()),
                ));
            }
        }
    }
    if freeze.is_none() {
        record.step = Step::Snapshotting;
        ctx.save(record)?;
    }

    // Frozen from here: only the snapshot calls and the small state copies, nothing slow. The
    // LVM snapshots go first: if libvirt's then fails, they are cheap to remove, while undoing
    // libvirt's overlays means merging them back.
    let result = (|| {
        crash_point("create-before-snapshot");
        check_deadline(deadline)?;
        if freeze.is_none() {
            ctx.progress(record, "snapshotting the disks");
        }
        let lvm = ctx.lvm_tool();
        lvm_volumes::take(&lvm, &record.uuid, &record.volumes)?;
        if record.volumes.iter().any(|v| v.lvm.is_none()) {
            let xml = snapshot_xml(record, &vm.disks);
            if let Err(e) = dom.create_snapshot_xml(&xml, SNAPSHOT_FLAGS) {
                lvm_volumes::discard(&lvm, &record.uuid, &record.volumes);
                return Err(format!(
                    "libvirt could not snapshot the disks: {}",
                    e.message()
                ));
            }
        }
        crash_point("create-after-snapshot");
        copy_extra_state(record)
    })();

    if let Some((guard, started)) = freeze {
        match virt_ext::fs_thaw(&dom) {
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
                warn!(vm = %record.vm_name, error = %e.message(), "thaw failed; the thaw guard retries");
                drop(guard);
            }
        }
        ctx.progress(record, "thawed the guest's filesystems");
    }

    let result = result.and_then(|()| {
        if ctx.require_quiesce
            && (record.indications.contains(&Indication::QuiesceFailed)
                || record.indications.contains(&Indication::QuiesceTimeout))
        {
            Err(
                "the guest was thawed before the disks were snapshotted; require_quiesce is \
                 set, so the snapshot was undone"
                    .to_string(),
            )
        } else {
            Ok(())
        }
    });
    if let Err(error) = result {
        // libvirt's atomic snapshot creates all overlays or none; undo those a later failure
        // left in use.
        rollback_overlays(ctx, &dom, record);
        lvm_volumes::discard(&ctx.lvm_tool(), &record.uuid, &record.volumes);
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

/// Each indication of `record` with its message: the one noted when it was given, or one
/// that says what it means.
pub(crate) fn source_indications(
    record: &SnapshotRecord,
    notes: &[(Indication, String)],
) -> Vec<vmsnap_api::SourceIndication> {
    record
        .indications
        .iter()
        .map(|indication| {
            let noted = notes
                .iter()
                .find(|(i, _)| i == indication)
                .map(|(_, m)| m.clone());
            let message = noted.unwrap_or_else(|| match indication {
                Indication::Online => "the VM was running when the snapshot was taken".to_string(),
                Indication::GuestAgent => format!(
                    "the guest agent froze {} filesystem(s) for {} ms",
                    record.frozen_filesystems, record.freeze_duration_ms
                ),
                Indication::NoGuestAgent => {
                    "no guest agent answered: the snapshot is crash-consistent".to_string()
                }
                Indication::QuiesceFailed => "the freeze failed: the snapshot is \
                                              crash-consistent"
                    .to_string(),
                Indication::QuiesceTimeout => "the freeze did not finish in time: the \
                                               snapshot is crash-consistent"
                    .to_string(),
                Indication::Paused => {
                    "the VM was paused: its disks were consistent without a freeze".to_string()
                }
                Indication::PartialSnapshot => format!(
                    "disks left out: {}",
                    record
                        .excluded
                        .iter()
                        .map(|v| format!("{} ({})", v.target, v.reason))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            vmsnap_api::SourceIndication {
                indication: indication.as_str().to_string(),
                message,
            }
        })
        .collect()
}

/// Fault injection for the crash-safety tests: when VMSNAP_TEST_CRASH_AT names this point, the
/// daemon dies on the spot, as a SIGKILL or power cut would leave it.
pub(crate) fn crash_point(name: &str) {
    if std::env::var("VMSNAP_TEST_CRASH_AT").is_ok_and(|v| v == name) {
        warn!(point = name, "VMSNAP_TEST_CRASH_AT: aborting");
        std::process::abort();
    }
}

/// Removes the overlays and snapshot LVs a failed snapshot made that no disk uses.
fn remove_unused_overlays(ctx: &OpContext, record: &SnapshotRecord) {
    lvm_volumes::discard(&ctx.lvm_tool(), &record.uuid, &record.volumes);
    let Ok(conn) = connect(&ctx.uri) else {
        return;
    };
    let Ok(dom) = lookup(&conn, &record.vm_uuid) else {
        return;
    };
    for volume in record.volumes.iter().filter(|v| v.lvm.is_none()) {
        if Path::new(&volume.overlay).exists() {
            discard_overlay(&dom, &volume.overlay);
        }
    }
}

fn check_deadline(deadline: Instant) -> Result<(), String> {
    if Instant::now() > deadline {
        Err("the snapshot did not finish within failure_deadline".to_string())
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

fn snapshot_xml(record: &SnapshotRecord, disks: &[vmsnap_api::DiskInfo]) -> String {
    let mut xml = format!("<domainsnapshot><name>vmsnap-{}</name><disks>", record.uuid);
    for disk in disks {
        match record
            .volumes
            .iter()
            .find(|v| v.target == disk.target && v.lvm.is_none())
        {
            Some(v) => xml.push_str(&format!(
                "<disk name='{}' snapshot='external' type='file'><driver type='qcow2'/><source file='{}'/></disk>",
                xml_escape(&v.target),
                xml_escape(&v.overlay)
            )),
            None => xml.push_str(&format!(
                "<disk name='{}' snapshot='no'/>",
                xml_escape(&disk.target)
            )),
        }
    }
    xml.push_str("</disks></domainsnapshot>");
    xml
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn copy_extra_state(record: &SnapshotRecord) -> Result<(), String> {
    for copy in &record.extra_state {
        let source = Path::new(&copy.source);
        let target = Path::new(&copy.copy);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let copied = if source.is_dir() {
            files::copy_dir_new(source, target)
        } else {
            files::copy_file_new(source, target)
        };
        copied.map_err(|e| {
            format!(
                "cannot copy the VM's {} state {}: {e}",
                copy.kind, copy.source
            )
        })?;
    }
    Ok(())
}

/// Undoes a snapshot's overlays that are in use: merges each back into its image. Best effort;
/// leftovers are logged.
fn rollback_overlays(ctx: &OpContext, dom: &Domain, record: &SnapshotRecord) {
    for volume in record.volumes.iter().filter(|v| v.lvm.is_none()) {
        match merge(
            ctx,
            dom,
            record,
            volume,
            &volume.image,
            &volume.overlay,
            Instant::now() + ctx.failure_deadline,
        ) {
            Ok(()) => {}
            Err(e) => warn!(disk = %volume.target, error = %e, "could not roll back an overlay"),
        }
        discard_overlay(dom, &volume.overlay);
    }
}

// ---------------------------------------------------------------------------------------------
// Delete

/// Deletes snapshot `record`; `others` are the VM's other snapshots (their records change where
/// they referred to an image this delete merges away).
pub fn delete(ctx: &OpContext, mut record: SnapshotRecord, mut others: Vec<SnapshotRecord>) {
    if let Err(error) = delete_steps(ctx, &mut record, &mut others) {
        warn!(vm = %record.vm_name, snapshot = %record.name, %error, "delete failed");
        // The snapshot's own image may already hold merged data from later writes: its content
        // is no longer the snapshot's, so it is not offered for restore again.
        record.phase = SnapshotPhase::Failed;
        record.ready_to_use = false;
        let error = format!("delete failed: {error}");
        record.error = vmsnap_api::record_error(&error);
        ctx.save_failed(&mut record);
    }
}

fn delete_steps(
    ctx: &OpContext,
    record: &mut SnapshotRecord,
    others: &mut [SnapshotRecord],
) -> Result<(), String> {
    let deadline = Instant::now() + ctx.failure_deadline;
    // A snapshot that failed while being created holds no data anything depends on: its
    // overlays were rolled back. Only leftovers are removed. (One that failed mid-delete is
    // still Merging and resumes below.)
    let never_taken =
        record.phase == SnapshotPhase::Failed && !matches!(record.step, Step::Merging { .. });
    let conn = connect(&ctx.uri)?;
    let lvm = ctx.lvm_tool();
    if never_taken {
        lvm_volumes::discard(&lvm, &record.uuid, &record.volumes);
        if let Ok(dom) = lookup(&conn, &record.vm_uuid) {
            for volume in record.volumes.iter().filter(|v| v.lvm.is_none()) {
                if Path::new(&volume.overlay).exists() {
                    discard_overlay(&dom, &volume.overlay);
                }
            }
        }
    } else {
        if record.phase != SnapshotPhase::Deleting {
            record.phase = SnapshotPhase::Deleting;
            record.ready_to_use = false;
            ctx.save(record)?;
        }
        let volumes = record.volumes.clone();
        for volume in volumes.iter().filter(|v| v.lvm.is_some()) {
            ctx.progress(
                record,
                format!("removing the snapshot LV of disk {}", volume.target),
            );
            lvm_volumes::remove(&lvm, &record.uuid, volume)?;
        }
        for volume in volumes.iter().filter(|v| v.lvm.is_none()) {
            ctx.progress(record, format!("releasing disk {}", volume.target));
            release_image(
                ctx,
                &conn,
                record,
                others,
                &volume.target,
                &volume.image,
                deadline,
            )?;
        }
    }
    ctx.progress(record, "");
    ctx.store
        .remove(record)
        .map_err(|e| format!("cannot remove the snapshot record: {e}"))?;
    let _ = ctx.events.send(OpEvent::Removed {
        uuid: record.uuid.clone(),
    });
    info!(vm = %record.vm_name, snapshot = %record.name, "snapshot deleted");
    Ok(())
}

/// Gives up `deleting`'s claim on `image` and reclaims what nothing needs any more:
/// - an image something else claims (another snapshot, a VM's top) stays;
/// - an unclaimed image nothing builds on is removed, and its backing image is looked at next;
/// - an unclaimed image with exactly one image on top is merged with it (the one on top is
///   committed down, costing the data written since), and the claims on that image move down;
/// - an unclaimed image several chains build on stays: each still needs it.
fn release_image(
    ctx: &OpContext,
    conn: &Connect,
    deleting: &mut SnapshotRecord,
    others: &mut [SnapshotRecord],
    target: &str,
    image: &str,
    deadline: Instant,
) -> Result<(), String> {
    // A merge that was under way when vmsnapd stopped is finished first.
    if let Step::Merging {
        target: t,
        base,
        top,
    } = deleting.step.clone()
    {
        if t == target {
            let forest = Forest::scan(conn, others)?;
            if forest.contains(&top) && forest.parent(&top) == Some(base.as_str()) {
                merge_down(ctx, conn, &forest, deleting, target, &base, &top, deadline)?;
            }
            move_claims(ctx, others, &top, &base, &Forest::scan(conn, others)?)?;
            prune_unclaimed(conn, others, &top)?;
            deleting.step = Step::Done;
            ctx.save(deleting)?;
            return Ok(());
        }
    }
    let mut current = image.to_string();
    loop {
        let forest = Forest::scan_with(conn, others, &[current.as_str()])?;
        if !forest.contains(&current) || is_owned(&current, &forest, others) {
            return Ok(());
        }
        let children = forest.children(&current);
        match children.as_slice() {
            [] => {
                // Gone, with any backing image that only it kept; the first one that stays may
                // now have a single image on top, to merge on the next round.
                let parent = forest.parent(&current).map(str::to_string);
                prune_unclaimed(conn, others, &current)?;
                match parent {
                    Some(p) => current = p,
                    None => return Ok(()),
                }
            }
            [child] => {
                let child = child.clone();
                deleting.step = Step::Merging {
                    target: target.to_string(),
                    base: current.clone(),
                    top: child.clone(),
                };
                ctx.save(deleting)?;
                if !merge_down(
                    ctx, conn, &forest, deleting, target, &current, &child, deadline,
                )? {
                    deleting.step = Step::Done;
                    ctx.save(deleting)?;
                    return Ok(());
                }
                move_claims(ctx, others, &child, &current, &Forest::scan(conn, others)?)?;
                prune_unclaimed(conn, others, &child)?;
                deleting.step = Step::Done;
                ctx.save(deleting)?;
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
}

/// Commits `top` into `base`, its backing image, wherever `top` is used: by block commit in a
/// running VM, else with qemu-img (rebasing the images on `top` and updating definitions whose
/// disk is `top`). Returns false, changing nothing, when it cannot be done safely now (several
/// running VMs use `top`, or a running VM and other chains do); the space is then reclaimed by
/// a later delete.
#[allow(clippy::too_many_arguments)]
fn merge_down(
    ctx: &OpContext,
    conn: &Connect,
    forest: &Forest,
    record: &SnapshotRecord,
    target: &str,
    base: &str,
    top: &str,
    deadline: Instant,
) -> Result<bool, String> {
    ctx.progress(record, format!("merging disk {target}"));
    let running = forest.running_users(top);
    let children = forest.children(top);
    match running.as_slice() {
        [user] if children.len() <= 1 => {
            let dom = lookup(conn, &user.domain_uuid)?;
            abort_leftover_job(&dom, &user.target)?;
            if std::env::var("VMSNAP_TEST_CRASH_AT").is_ok_and(|v| v == "delete-mid-merge") {
                let _ = virt_ext::block_commit(&dom, &user.target, base, top, user.path == top);
                crash_point("delete-mid-merge");
            }
            let mut report = |cur: u64, end: u64| {
                if let Some(percent) = cur.saturating_mul(100).checked_div(end) {
                    ctx.progress(record, format!("merging disk {target} ({percent}%)"));
                }
            };
            virt_ext::commit_and_wait(
                &dom,
                &user.target,
                base,
                top,
                user.path == top,
                deadline,
                &mut report,
            )?;
            refresh_definitions(conn, forest, base, top)?;
            Ok(true)
        }
        [] => {
            let base_format = forest.format(base).to_string();
            qemu_img::commit(top, deadline)?;
            for child in &children {
                qemu_img::rebase_unsafe(child, base, &base_format)?;
            }
            refresh_definitions(conn, forest, base, top)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// After `top` was merged into `base`: every stored definition that still names `top` (as its
/// disk, or in the `<backingStore>` chain libvirt writes into it) names the real chain again,
/// else that VM would not start. The disk's source becomes `base` where it was `top`; the
/// backing chain is left out, for libvirt to read from the images at the next start. `forest`
/// is the one from before the merge.
fn refresh_definitions(
    conn: &Connect,
    forest: &Forest,
    base: &str,
    top: &str,
) -> Result<(), String> {
    for user in forest.users(top) {
        let dom = lookup(conn, &user.domain_uuid)?;
        let inactive = dom
            .xml_desc(VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE)
            .map_err(|e| e.message().to_string())?;
        let (source, format) = domain::disk_source(&inactive, &user.target)?;
        if !domain::disk_names_image(&inactive, &user.target, top)? {
            continue;
        }
        let (source, format) = if source == top {
            (base.to_string(), forest.format(base).to_string())
        } else {
            (source, format)
        };
        let edited = domain::set_disk_source(&inactive, &user.target, &source, &format)?;
        conn.define_domain_xml(&edited)
            .map_err(|e| format!("cannot update a VM definition: {}", e.message()))?;
    }
    Ok(())
}

fn abort_leftover_job(dom: &Domain, disk: &str) -> Result<(), String> {
    // A job left behind by a vmsnapd that died mid-merge still runs in QEMU: stop it (without
    // pivoting) and merge again; a commit of the same images is idempotent.
    if let Ok(Some(_)) = virt_ext::block_job_info(dom, disk) {
        warn!(%disk, "aborting a block job left by an earlier vmsnapd");
        virt_ext::block_job_abort(dom, disk, false)
            .map_err(|e| format!("cannot abort the leftover block job: {}", e.message()))?;
        let until = Instant::now() + Duration::from_secs(30);
        while matches!(virt_ext::block_job_info(dom, disk), Ok(Some(_))) {
            if Instant::now() > until {
                return Err("the leftover block job does not end".to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// After `from` was merged into `to`: records that named `from` as their image now name `to`.
fn move_claims(
    ctx: &OpContext,
    records: &mut [SnapshotRecord],
    from: &str,
    to: &str,
    forest: &Forest,
) -> Result<(), String> {
    let format = forest.format(to).to_string();
    for record in records.iter_mut() {
        let mut changed = false;
        for v in record.volumes.iter_mut().filter(|v| v.image == from) {
            v.image = to.to_string();
            v.image_format = format.clone();
            changed = true;
        }
        if changed {
            ctx.save(record)?;
        }
    }
    Ok(())
}

/// Merges image `top` into `base` (its backing file) for one disk, online or offline, and takes
/// `top` out of the chain. Already merged (top no longer in the chain): nothing to do.
fn merge(
    ctx: &OpContext,
    dom: &Domain,
    record: &SnapshotRecord,
    volume: &VolumeRecord,
    base: &str,
    top: &str,
    deadline: Instant,
) -> Result<(), String> {
    let xml = current_xml(dom)?;
    let (current_top, _) = domain::disk_source(&xml, &volume.target)?;
    let chain = qemu_img::backing_chain(&current_top)?;
    let Some(top_index) = chain.iter().position(|i| i.path == top) else {
        return Ok(());
    };
    let base_index = chain.iter().position(|i| i.path == base).ok_or_else(|| {
        format!(
            "disk {}: {base} is no longer in the disk's chain",
            volume.target
        )
    })?;
    if base_index != top_index + 1 {
        return Err(format!(
            "disk {}: {top} is not directly on top of {base}",
            volume.target
        ));
    }
    let base_format = chain[base_index].format.clone();
    let active = top_index == 0;
    if is_active(dom)? {
        abort_leftover_job(dom, &volume.target)?;
        let mut report = |cur: u64, end: u64| {
            if let Some(percent) = cur.saturating_mul(100).checked_div(end) {
                ctx.progress(
                    record,
                    format!("merging disk {} ({percent}%)", volume.target),
                );
            }
        };
        virt_ext::commit_and_wait(
            dom,
            &volume.target,
            base,
            top,
            active,
            deadline,
            &mut report,
        )
    } else {
        qemu_img::commit(top, deadline)?;
        if active {
            let inactive = dom
                .xml_desc(VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE)
                .map_err(|e| e.message().to_string())?;
            let edited = domain::set_disk_source(&inactive, &volume.target, base, &base_format)?;
            let conn = dom.connect().map_err(|e| e.message().to_string())?;
            conn.define_domain_xml(&edited)
                .map_err(|e| format!("cannot update the VM definition: {}", e.message()))?;
            Ok(())
        } else {
            let above = &chain[top_index - 1];
            qemu_img::rebase_unsafe(&above.path, base, &base_format)
        }
    }
}

/// Removes an overlay (and what only it kept) once no chain uses it. Best effort: what stays is
/// logged.
fn discard_overlay(dom: &Domain, path: &str) {
    let pruned = dom
        .connect()
        .map_err(|e| e.message().to_string())
        .and_then(|conn| prune_unclaimed(&conn, &[], path));
    if let Err(e) = pruned {
        warn!(%path, error = %e, "cannot remove an overlay");
    }
}

// ---------------------------------------------------------------------------------------------
// Recovery

/// Settles a record a previous vmsnapd left unfinished: thaws the guest if it may be frozen,
/// finishes a snapshot whose disks were taken, rolls back one whose were not, and resumes a
/// delete.
pub fn recover(ctx: &OpContext, mut record: SnapshotRecord, others: Vec<SnapshotRecord>) {
    info!(vm = %record.vm_name, snapshot = %record.name, step = ?record.step, "settling an unfinished operation");
    match record.phase {
        SnapshotPhase::Deleting => delete(ctx, record, others),
        SnapshotPhase::InProgress => {
            if let Err(error) = recover_create(ctx, &mut record) {
                record.phase = SnapshotPhase::Failed;
                record.ready_to_use = false;
                record.error = vmsnap_api::record_error(&error);
                record.step = Step::Done;
                ctx.save_failed(&mut record);
            }
        }
        SnapshotPhase::Succeeded | SnapshotPhase::Failed => {
            record.step = Step::Done;
            let _ = ctx.save(&record);
        }
    }
}

fn recover_create(ctx: &OpContext, record: &mut SnapshotRecord) -> Result<(), String> {
    let conn = connect(&ctx.uri)?;
    let dom = lookup(&conn, &record.vm_uuid)?;
    if record.step == Step::Freezing {
        // Harmless when not frozen; a frozen guest must not wait for anything else.
        match virt_ext::fs_thaw(&dom) {
            Ok(_) => info!(vm = %record.vm_name, "thawed the guest left frozen"),
            Err(e) => info!(vm = %record.vm_name, error = %e.message(), "thaw on recovery"),
        }
    }
    let xml = current_xml(&dom)?;
    let lvm = ctx.lvm_tool();
    let mut taken = 0;
    for volume in &record.volumes {
        if volume.lvm.is_some() {
            if lvm_volumes::is_taken(&lvm, &record.uuid, volume)? {
                taken += 1;
            }
            continue;
        }
        let (top, _) = domain::disk_source(&xml, &volume.target)?;
        let chain = qemu_img::backing_chain(&top)?;
        if chain.iter().any(|i| i.path == volume.overlay) {
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
        rollback_overlays(ctx, &dom, record);
    }
    lvm_volumes::discard(&lvm, &record.uuid, &record.volumes);
    for volume in record.volumes.iter().filter(|v| v.lvm.is_none()) {
        discard_overlay(&dom, &volume.overlay);
    }
    Err("vmsnapd stopped before the snapshot was complete; nothing was kept".to_string())
}
