//! Delete: each backend releases the snapshot's volumes (journaled in the record, phase
//! Deleting), then the record goes. And the settling of a snapshot record a previous vmsnapd
//! left unfinished.

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};
use vmsnap_api::SnapshotPhase;

use super::create::{discard_all, recover_create};
use super::{OpContext, OpError, OpResult};
use crate::backends::Env;
use crate::store::{SnapshotRecord, Step};

/// Deletes snapshot `record`; `others` are the VM's other snapshots (their records change where
/// they referred to an image this delete merges away).
pub fn delete(ctx: &OpContext, mut record: SnapshotRecord, mut others: Vec<Arc<SnapshotRecord>>) {
    let Err(error) = check_and_delete(ctx, &mut record, &mut others) else {
        return;
    };
    match error {
        NotDeleted::Refused(error) => {
            // Nothing changed: the snapshot stays as it was, with why it was not deleted.
            warn!(vm = %record.vm_name, snapshot = %record.name, %error, "delete refused");
            record.phase = SnapshotPhase::Succeeded;
            record.ready_to_use = true;
            record.error_name = error.error_name().into();
            record.error = vmsnap_api::record_error(&error.to_string()).into();
            ctx.save_failed(&mut record);
        }
        NotDeleted::Failed(error) => {
            warn!(vm = %record.vm_name, snapshot = %record.name, %error, "delete failed");
            ctx.hold_vm();
            // The snapshot's own image may already hold merged data from later writes: its
            // content is no longer the snapshot's, so it is not offered for restore again.
            record.phase = SnapshotPhase::Failed;
            record.ready_to_use = false;
            record.error_name = error.error_name().into();
            record.error = vmsnap_api::record_error(&format!("delete failed: {error}")).into();
            ctx.save_failed(&mut record);
        }
    }
    // The last step's text would stay on show beside the error.
    ctx.progress(&record, "");
}

/// How a delete ended when it did not: refused before anything changed, or failed on the way.
enum NotDeleted {
    Refused(OpError),
    Failed(OpError),
}

/// One session for the check and the delete: what the check learns (the qcow2 backend's scan
/// of the host) serves the delete right after it.
fn check_and_delete(
    ctx: &OpContext,
    record: &mut SnapshotRecord,
    others: &mut [Arc<SnapshotRecord>],
) -> Result<(), NotDeleted> {
    let ready = record.phase == SnapshotPhase::Succeeded;
    let host = ctx.hypervisor.session().map_err(|error| {
        if ready {
            NotDeleted::Refused(error)
        } else {
            NotDeleted::Failed(error)
        }
    })?;
    let env = Env::new(ctx, host.as_ref());
    if ready {
        check_release(&env, record, others).map_err(NotDeleted::Refused)?;
    }
    delete_steps(&env, record, others).map_err(NotDeleted::Failed)
}

fn delete_steps(
    env: &Env,
    record: &mut SnapshotRecord,
    others: &mut [Arc<SnapshotRecord>],
) -> OpResult<()> {
    let ctx = env.ctx;
    let deadline = Instant::now() + ctx.failure_deadline;
    // A snapshot that failed while being created holds no data anything depends on: its
    // captures were undone. Only leftovers are removed. (One that failed mid-delete is still
    // Merging and resumes below.)
    let never_taken =
        record.phase == SnapshotPhase::Failed && !matches!(record.step, Step::Merging(_));
    if never_taken {
        discard_all(env, record);
    } else {
        if record.phase != SnapshotPhase::Deleting {
            record.phase = SnapshotPhase::Deleting;
            record.ready_to_use = false;
            ctx.save(record)?;
        }
        for (backend, volumes) in ctx.backends.batches(&record.volumes.clone())? {
            for volume in &volumes {
                ctx.check_abandoned("delete")?;
                backend.release(env, record, others, volume, deadline)?;
            }
        }
        if !ctx.gate.succeed() {
            ctx.check_abandoned("delete")?;
        }
    }
    ctx.progress(record, "");
    ctx.remove_record(record)?;
    info!(vm = %record.vm_name, snapshot = %record.name, "snapshot deleted");
    Ok(())
}

/// Marks the snapshot Deleting (so that a watcher sees the delete begin and end), then asks
/// every backend whether it can release its volumes now, before anything changes.
fn check_release(
    env: &Env,
    record: &mut SnapshotRecord,
    others: &[Arc<SnapshotRecord>],
) -> OpResult<()> {
    let ctx = env.ctx;
    record.phase = SnapshotPhase::Deleting;
    record.ready_to_use = false;
    ctx.save(record)?;
    for (backend, volumes) in ctx.backends.batches(&record.volumes.clone())? {
        for volume in &volumes {
            backend.check_release(env, record, others, volume)?;
        }
    }
    Ok(())
}

/// Retries the checks of VM `vm_uuid`'s images that earlier operations could not make (a
/// replaced restore clone kept because the cluster did not answer, or vmsnapd died before the
/// check), against `records`, the records now.
pub fn retry_pending_checks(ctx: &OpContext, vm_uuid: &str, records: &[Arc<SnapshotRecord>]) {
    let host = match ctx.hypervisor.session() {
        Ok(host) => host,
        Err(error) => {
            warn!(vm_uuid, %error, "pending orphan checks wait for the next start or delete");
            return;
        }
    };
    let env = Env::new(ctx, host.as_ref());
    for backend in ctx.backends.all() {
        backend.retry_pending_checks(&env, vm_uuid, records);
    }
}

/// Settles a record a previous vmsnapd left unfinished: thaws the guest if it may be frozen,
/// finishes a snapshot whose disks were taken, rolls back one whose were not, and resumes a
/// delete.
pub fn recover(ctx: &OpContext, mut record: SnapshotRecord, others: Vec<Arc<SnapshotRecord>>) {
    info!(vm = %record.vm_name, snapshot = %record.name, step = ?record.step, "settling an unfinished operation");
    match record.phase {
        SnapshotPhase::Deleting => delete(ctx, record, others),
        SnapshotPhase::InProgress => {
            if let Err(error) = recover_create(ctx, &mut record) {
                record.phase = SnapshotPhase::Failed;
                record.ready_to_use = false;
                record.error = vmsnap_api::record_error(&error.to_string()).into();
                record.error_name = error.error_name().into();
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
