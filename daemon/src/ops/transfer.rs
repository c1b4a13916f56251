//! Moving a snapshot between hosts that share its storage: a snapshot whose every volume lives
//! in a cluster (RBD) is exported as its content record (JSON, the definition's secrets left
//! out) on one host and imported on another, which accepts it only once the cluster has shown
//! every one of its RBD snapshots. A snapshot with a volume on this host's files or LVs stays
//! where it is: its data is not reachable from elsewhere.

use vmsnap_api::{validate_description, validate_snapshot_name, validate_vm_name, SnapshotPhase};

use super::{OpContext, OpEvent};
use crate::backends::Env;
use crate::store::{DomainXml, SnapshotRecord, Step};

/// Why `record` cannot move to another host, if it cannot.
pub fn check_exportable(record: &SnapshotRecord) -> Result<(), String> {
    if record.phase != SnapshotPhase::Succeeded || record.step != Step::Done {
        return Err(format!(
            "snapshot '{}' is {}: only a succeeded snapshot can be exported",
            record.name,
            record.phase.as_str()
        ));
    }
    if record.volumes.is_empty() {
        return Err(format!(
            "snapshot '{}' has no volume in a shared cluster to move",
            record.name
        ));
    }
    if let Some(local) = record.volumes.iter().find(|v| v.rbd().is_none()) {
        return Err(format!(
            "snapshot '{}' cannot move to another host: its disk {} is a {} volume on this host \
             (only snapshots whose every disk is on Ceph RBD can)",
            record.name,
            local.target,
            local.backend_name()
        ));
    }
    if !record.extra_state.is_empty() {
        return Err(format!(
            "snapshot '{}' cannot move to another host: it holds state files (NVRAM, TPM) on \
             this host",
            record.name
        ));
    }
    Ok(())
}

/// The record as another host imports it: its definition without secrets (as everyone may
/// read it here), pretty JSON.
pub fn export_json(mut record: SnapshotRecord) -> Result<String, String> {
    check_exportable(&record)?;
    let DomainXml::Held(xml) = &record.domain_xml else {
        return Err("the record was read without its definition".to_string());
    };
    record.domain_xml = DomainXml::Held(crate::domain::without_secrets(xml));
    serde_json::to_string_pretty(&record).map_err(|e| e.to_string())
}

/// Parses and checks a record another host exported: every name and path in it is checked as
/// if a user had typed it, since it reaches libvirt, the `rbd` command and this host's records.
pub fn parse_import(json: &str) -> Result<SnapshotRecord, String> {
    let mut record = crate::store::parse_snapshot_record(json.as_bytes())
        .map_err(|e| format!("not a vmsnap snapshot record: {e}"))?;
    let uuid_ok = |u: &str| uuid::Uuid::parse_str(u).is_ok() && u.len() == 36;
    if !uuid_ok(&record.uuid) || !uuid_ok(&record.vm_uuid) {
        return Err("the record's uuid and vmUuid must be UUIDs".to_string());
    }
    record.uuid = record.uuid.to_ascii_lowercase();
    record.vm_uuid = crate::store::shared_str(&record.vm_uuid.to_ascii_lowercase());
    validate_snapshot_name(&record.name)?;
    validate_vm_name(&record.vm_name)?;
    validate_description(&record.description)?;
    check_exportable(&record)?;
    for volume in &record.volumes {
        if let Some(v) = volume.rbd() {
            crate::backends::rbd::check_portable(&volume.target, &volume.image, v)?;
        }
    }
    let DomainXml::Held(xml) = &record.domain_xml else {
        return Err("the record has no definition".to_string());
    };
    let vm = crate::domain::parse_domain(
        xml,
        vmsnap_api::VmState::Unknown,
        &crate::disks::SysfsLvmProbe,
    )
    .map_err(|e| format!("the record's definition: {e}"))?;
    if vm.uuid != *record.vm_uuid || vm.name != *record.vm_name {
        return Err("the record's definition names another VM than the record".to_string());
    }
    // Readiness is this host's to verify; the phase came from the exporting host.
    record.ready_to_use = true;
    record.error = Box::default();
    record.error_name = Box::default();
    Ok(record)
}

/// On an operation thread: checks every RBD snapshot of `record` in its cluster, then writes
/// the record (the engine announces it). Refused without a trace otherwise.
pub fn import(ctx: &OpContext, record: SnapshotRecord) {
    let checked = ctx.hypervisor.session().and_then(|host| {
        let env = Env::new(ctx, host.as_ref());
        for volume in &record.volumes {
            ctx.backends
                .for_volume(volume)?
                .check_intact(&env, &record, volume)?;
        }
        Ok(())
    });
    let refused = match checked {
        Ok(()) => match ctx.save(&record) {
            Ok(()) => return,
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    let _ = ctx.events.send(OpEvent::NotStarted {
        uuid: record.uuid.clone(),
        error: format!("snapshot '{}' not imported: {refused}", record.name),
        refused: true,
    });
}
