//! Merging qcow2 layers: what a delete does to reclaim a snapshot's image, and what undoing a
//! capture does. Each merge is journaled in the deleting record (step Merging) before it
//! starts, and recognised as done after a crash when QEMU finished it alone.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;
use virt::connect::Connect;
use virt::domain::Domain;

use super::chain;
use super::forest::{is_owned, prune, prune_unclaimed, Forest, HostView};
use super::qemu_img;
use crate::domain;
use crate::hypervisor::libvirt::{VIR_DOMAIN_XML_INACTIVE, VIR_DOMAIN_XML_SECURE};
use crate::ops::{OpContext, OpError, OpResult};
use crate::store::{Artifact, Merge, SnapshotRecord, Step, VolumeRecord};
use crate::virt_ext;

pub(super) fn lookup(conn: &Connect, uuid: &str) -> Result<Domain, String> {
    conn.lookup_domain_by_uuid_string(uuid)
        .map_err(|e| format!("VM {uuid}: {}", e.message()))
}

fn is_active(dom: &Domain) -> Result<bool, String> {
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

/// Gives up `deleting`'s claim on `image` and reclaims what nothing needs any more:
/// - an image something else claims (another snapshot, a VM's top) stays;
/// - an unclaimed image nothing builds on is removed, and its backing image is looked at next;
/// - an unclaimed image with exactly one image on top is merged with it (the one on top is
///   committed down, costing the data written since), and the claims on that image move down;
/// - an unclaimed image several chains build on stays: each still needs it.
///
/// `checked` is the forest [`check_room`] scanned around `image` moments before, if any.
#[allow(clippy::too_many_arguments)]
pub(super) fn release_image(
    ctx: &OpContext,
    view: &HostView,
    deleting: &mut SnapshotRecord,
    others: &mut [Arc<SnapshotRecord>],
    target: &str,
    image: &str,
    checked: Option<Forest>,
    deadline: Instant,
) -> OpResult<()> {
    // A merge that was under way when vmsnapd stopped is finished first.
    if let Step::Merging(merge) = deleting.step.clone() {
        let Merge {
            target: t,
            base,
            top,
        } = *merge;
        if t == target {
            let conn = view.conn;
            let forest = Forest::scan(view, others, &[top.as_str(), base.as_str()])?;
            // QEMU finishes a block commit of a lower layer on its own, also with vmsnapd gone:
            // then no disk goes through `top` any more, one goes through `base`, and nothing
            // builds on `top`. Merging it again would write into an image a running VM holds.
            let finished_by_qemu = !forest.in_any_chain(&top)
                && forest.in_any_chain(&base)
                && forest.children(&top).is_empty();
            if forest.contains(&top)
                && forest.parent(&top) == Some(base.as_str())
                && !finished_by_qemu
            {
                merge_down(ctx, conn, &forest, deleting, target, &base, &top, deadline)?;
            }
            // The format of `base` is as before the merge.
            move_claims(ctx, others, &top, &base, &forest)?;
            let mut merged = forest.scan_again(view, others, &[top.as_str()])?;
            prune(&mut merged, others, &top)?;
            deleting.step = Step::Done;
            ctx.save(deleting)?;
            return Ok(());
        }
    }
    let conn = view.conn;
    let mut current = image.to_string();
    // A forest scanned around an image serves its backing images too (see `prune`), until a
    // merge changes the chains.
    let mut scanned = checked;
    loop {
        let mut forest = match scanned.take() {
            Some(forest) => forest,
            None => Forest::scan(view, others, &[current.as_str()])?,
        };
        if !forest.contains(&current) || is_owned(&current, &forest, others) {
            return Ok(());
        }
        let children = forest.children(&current);
        match children.as_slice() {
            // The one image on top is a file vmsnapd does not know (an undefined VM's disk, a
            // copy made by hand): it is not vmsnapd's to merge away, and it needs this image.
            // The image stays; its space is the price of that file.
            [child] if forest.is_unknown(child) => return Ok(()),
            [] => {
                // Gone, with any backing image that only it kept; the first one that stays may
                // now have a single image on top, to merge on the next round.
                let parent = forest.parent(&current).map(str::to_string);
                prune(&mut forest, others, &current)?;
                match parent {
                    Some(p) => {
                        current = p;
                        scanned = Some(forest);
                    }
                    None => return Ok(()),
                }
            }
            [child] => {
                let child = child.clone();
                ctx.faults.point("delete-before-merge");
                deleting.step = Step::Merging(Box::new(Merge {
                    target: target.to_string(),
                    base: current.clone(),
                    top: child.clone(),
                }));
                ctx.save(deleting)?;
                if !merge_down(
                    ctx, conn, &forest, deleting, target, &current, &child, deadline,
                )? {
                    deleting.step = Step::Done;
                    ctx.save(deleting)?;
                    return Ok(());
                }
                move_claims(ctx, others, &child, &current, &forest)?;
                // Read again after the merge, but only where the merge could have changed
                // anything: the chains connected to the merged image.
                let mut merged = forest.scan_again(view, others, &[child.as_str()])?;
                prune(&mut merged, others, &child)?;
                deleting.step = Step::Done;
                ctx.save(deleting)?;
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
}

/// Room a merge needs beyond the data it copies: qcow2 metadata (L2 and refcount tables).
const MERGE_MARGIN: u64 = 4 << 20;

/// Before a delete changes anything: when releasing `image` merges the one image on top of it
/// into it (as [`release_image`] would), the filesystem holding `image` must have room for
/// what that image holds (its allocated size: at most what the merge adds). A merge that runs
/// out of space leaves the folder full, and a running guest then stops at its next write.
/// Returns the forest it scanned around `image`, for the release that follows.
pub(super) fn check_room(
    view: &HostView,
    deleting: &SnapshotRecord,
    others: &[Arc<SnapshotRecord>],
    image: &str,
) -> OpResult<Forest> {
    let forest = Forest::scan(view, others, &[image])?;
    if !forest.contains(image) || is_owned(image, &forest, others) {
        return Ok(forest);
    }
    let children = forest.children(image);
    let [top] = children.as_slice() else {
        return Ok(forest);
    };
    if forest.is_unknown(top) {
        return Ok(forest);
    }
    use std::os::unix::fs::MetadataExt;
    let needed = std::fs::metadata(top).map_or(0, |m| m.blocks().saturating_mul(512));
    let folder = Path::new(image).parent().unwrap_or(Path::new("/"));
    let Ok(free) = crate::files::available_bytes(folder) else {
        return Ok(forest);
    };
    if free < needed.saturating_add(MERGE_MARGIN) {
        let mib = |b: u64| b.div_ceil(1 << 20);
        return Err(OpError::Refused(format!(
            "no space left on device for deleting snapshot '{}': it merges up to {} MiB into {image}, \
             and {} MiB are free there; free some space there, then try again (nothing was changed)",
            deleting.name,
            mib(needed.saturating_add(MERGE_MARGIN)),
            mib(free)
        )));
    }
    Ok(forest)
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
) -> OpResult<bool> {
    ctx.progress(record, format!("merging disk {target}"));
    let running = forest.running_users(top);
    let children = forest.children(top);
    match running.as_slice() {
        [user] if children.len() <= 1 => {
            let dom = lookup(conn, &user.domain_uuid)?;
            abort_leftover_job(&dom, &user.target)?;
            if ctx.faults.crashes_at("delete-mid-merge") {
                let _ = virt_ext::block_commit(&dom, &user.target, base, top, user.path == top);
                ctx.faults.point("delete-mid-merge");
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
            )
            .map_err(|e| commit_failure(e, base))?;
            refresh_definitions(conn, forest, base, top)?;
            Ok(true)
        }
        // Offline, the images on `top` would be rebased onto `base`: not one vmsnapd does not
        // know (an undefined VM's disk, a copy made by hand), which it must not change.
        [] if children.iter().any(|c| forest.is_unknown(c)) => Ok(false),
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
fn refresh_definitions(conn: &Connect, forest: &Forest, base: &str, top: &str) -> OpResult<()> {
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

/// Below this much free space, a failed block commit is taken to have run out of it: a job that
/// failed for lack of space leaves next to nothing free (none at all on the lab's tmpfs).
const NEARLY_FULL: u64 = 16 << 20;

/// A failed block commit's error, saying so when the filesystem of `base` (where the merge
/// writes) is full: libvirt does not pass on QEMU's reason for a failed job, and this is the
/// one the user can act on.
fn commit_failure(error: String, base: &str) -> OpError {
    match crate::files::available_bytes(Path::new(base)) {
        Ok(free) if free < NEARLY_FULL => format!(
            "{error}; no space left on device where {base} is ({} KiB free): free some space \
             there, then try again",
            free / 1024
        )
        .into(),
        _ => error.into(),
    }
}

fn abort_leftover_job(dom: &Domain, disk: &str) -> OpResult<()> {
    // A job left behind by a vmsnapd that died mid-merge still runs in QEMU: stop it (without
    // pivoting) and merge again; a commit of the same images is idempotent.
    if let Ok(Some(_)) = virt_ext::block_job_info(dom, disk) {
        warn!(%disk, "aborting a block job left by an earlier vmsnapd");
        virt_ext::block_job_abort(dom, disk, false)
            .map_err(|e| format!("cannot abort the leftover block job: {}", e.message()))?;
        let until = Instant::now() + Duration::from_secs(30);
        while matches!(virt_ext::block_job_info(dom, disk), Ok(Some(_))) {
            if Instant::now() > until {
                return Err("the leftover block job does not end".to_string().into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// After `from` was merged into `to`: records that named `from` as their image now name `to`.
fn move_claims(
    ctx: &OpContext,
    records: &mut [Arc<SnapshotRecord>],
    from: &str,
    to: &str,
    forest: &Forest,
) -> OpResult<()> {
    let format = forest.format(to).to_string();
    let names_from =
        |v: &VolumeRecord| v.image == from && matches!(v.artifact, Artifact::Qcow2 { .. });
    for record in records.iter_mut() {
        if !record.volumes.iter().any(names_from) {
            continue;
        }
        // Copied only here: the records that do not change stay shared with the engine's.
        let record = Arc::make_mut(record);
        for v in record.volumes.iter_mut().filter(|v| names_from(v)) {
            if let Artifact::Qcow2 { image_format, .. } = &mut v.artifact {
                v.image = to.to_string();
                *image_format = format.clone();
            }
        }
        ctx.save(record)?;
    }
    Ok(())
}

/// Merges image `top` into `base` (its backing file) for one disk, online or offline, and takes
/// `top` out of the chain. Already merged (top no longer in the chain): nothing to do.
pub(super) fn merge(
    ctx: &OpContext,
    dom: &Domain,
    record: &SnapshotRecord,
    volume: &VolumeRecord,
    base: &str,
    top: &str,
    deadline: Instant,
) -> OpResult<()> {
    let xml = current_xml(dom)?;
    let (current_top, _) = domain::disk_source(&xml, &volume.target)?;
    let chain = chain::backing_chain_or_qemu_img(&current_top)?;
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
        )
        .into());
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
        .map_err(|e| commit_failure(e, base))
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
            Ok(qemu_img::rebase_unsafe(&above.path, base, &base_format)?)
        }
    }
}

/// Removes an overlay (and what only it kept) once no chain uses it. Best effort: what stays is
/// logged.
pub(super) fn discard_overlay(dom: &Domain, path: &str) {
    let pruned = dom
        .connect()
        .map_err(|e| e.message().to_string())
        .and_then(|conn| prune_unclaimed(&HostView::reading_all(&conn), &[], path));
    if let Err(e) = pruned {
        warn!(%path, error = %e, "cannot remove an overlay");
    }
}
