use std::collections::HashMap;

use tokio::sync::mpsc;
use vmsnap_api::{excerpt, restore_path, snapshot_path, vm_path, VmSnapError};
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedObjectPath, OwnedVariant};

use super::ask;
use super::auth::{Authorizer, ACTION_CREATE, ACTION_RESTORE};
use super::listing::{self, Listed, ManagerState, Objects, SharedRegistry, SnapshotRows};
use crate::engine::{CreateOptions, Request, RestoreOptions, READINESS_POLICIES};

/// `org.vmsnap.VmSnap1.Manager`: entry point for requests that are not about one object.
pub struct ManagerObject {
    engine: mpsc::Sender<Request>,
    auth: Authorizer,
    registry: SharedRegistry,
    libvirt_uri: String,
    libvirt_connected: bool,
    libvirt_error: String,
}

impl ManagerObject {
    /// The manager; the registry's manager state is set to its initial properties.
    pub fn new(
        engine: mpsc::Sender<Request>,
        auth: Authorizer,
        libvirt_uri: String,
        registry: SharedRegistry,
    ) -> Self {
        let manager = ManagerObject {
            engine,
            auth,
            registry,
            libvirt_uri,
            libvirt_connected: false,
            libvirt_error: "not connected yet".to_string(),
        };
        listing::write(&manager.registry).manager = ManagerState {
            libvirt_uri: manager.libvirt_uri.clone(),
            libvirt_connected: manager.libvirt_connected,
            libvirt_error: manager.libvirt_error.clone(),
        };
        manager
    }

    pub(super) async fn set_libvirt_status(
        &mut self,
        connected: bool,
        error: String,
        emitter: &SignalEmitter<'_>,
    ) -> zbus::Result<()> {
        if self.libvirt_connected != connected {
            self.libvirt_connected = connected;
            self.libvirt_connected_changed(emitter).await?;
        }
        if self.libvirt_error != error {
            self.libvirt_error = error;
            self.libvirt_error_changed(emitter).await?;
        }
        Ok(())
    }
}

fn object_path(uuid: &str) -> Result<OwnedObjectPath, VmSnapError> {
    OwnedObjectPath::try_from(vm_path(uuid)).map_err(VmSnapError::ZBus)
}

fn snapshot_object_path(uuid: &str) -> Result<OwnedObjectPath, VmSnapError> {
    OwnedObjectPath::try_from(snapshot_path(uuid)).map_err(VmSnapError::ZBus)
}

/// Reads the a{sv} options of CreateSnapshot; unknown keys and wrong types are errors, so a
/// typo does not silently change what is done.
/// More entries than any method knows options: such a dict is refused before it is looked at.
const MAX_OPTIONS: usize = 16;

/// Refuses an options dict too large to be meant, and names an unknown option safely.
fn check_options_size(options: &HashMap<String, OwnedVariant>) -> Result<(), VmSnapError> {
    if options.len() > MAX_OPTIONS {
        return Err(VmSnapError::InvalidArgument(format!(
            "{} options given; no method takes more than {MAX_OPTIONS}",
            options.len()
        )));
    }
    Ok(())
}

fn unknown_option(key: &str, known: &str) -> VmSnapError {
    VmSnapError::InvalidArgument(format!(
        "unknown option \"{}\" (known: {known})",
        excerpt(key)
    ))
}

fn create_options(options: HashMap<String, OwnedVariant>) -> Result<CreateOptions, VmSnapError> {
    check_options_size(&options)?;
    let mut parsed = CreateOptions::default();
    for (key, value) in options {
        let wrong_type = |expected: &str| {
            VmSnapError::InvalidArgument(format!("option {key} must be {expected}"))
        };
        match key.as_str() {
            "description" => {
                parsed.description = String::try_from(value).map_err(|_| wrong_type("a string"))?;
            }
            "allow_excluded" => {
                parsed.allow_excluded =
                    bool::try_from(value).map_err(|_| wrong_type("a boolean"))?;
            }
            "failure_deadline_ms" => {
                let ms = u64::try_from(value).map_err(|_| wrong_type("a uint64"))?;
                if ms == 0 || ms > 24 * 3600 * 1000 {
                    return Err(VmSnapError::InvalidArgument(
                        "option failure_deadline_ms must be between 1 ms and 24 h".to_string(),
                    ));
                }
                parsed.failure_deadline = Some(std::time::Duration::from_millis(ms));
            }
            other => {
                return Err(unknown_option(
                    other,
                    "description, allow_excluded, failure_deadline_ms",
                ))
            }
        }
    }
    Ok(parsed)
}

/// Reads the a{sv} options of Restore; unknown keys and wrong types are errors.
fn restore_options(options: HashMap<String, OwnedVariant>) -> Result<RestoreOptions, VmSnapError> {
    check_options_size(&options)?;
    let mut parsed = RestoreOptions::default();
    for (key, value) in options {
        let wrong_type = |expected: &str| {
            VmSnapError::InvalidArgument(format!("option {key} must be {expected}"))
        };
        match key.as_str() {
            "target" => {
                parsed.target = String::try_from(value).map_err(|_| wrong_type("a string"))?
            }
            "stop_target" => {
                parsed.stop_target = bool::try_from(value).map_err(|_| wrong_type("a boolean"))?
            }
            "start" => parsed.start = bool::try_from(value).map_err(|_| wrong_type("a boolean"))?,
            "safety_snapshot" => {
                parsed.safety_snapshot =
                    bool::try_from(value).map_err(|_| wrong_type("a boolean"))?
            }
            "name" => parsed.name = String::try_from(value).map_err(|_| wrong_type("a string"))?,
            "readiness_policy" => {
                let policy = String::try_from(value).map_err(|_| wrong_type("a string"))?;
                if !READINESS_POLICIES.contains(&policy.as_str()) {
                    return Err(VmSnapError::InvalidArgument(format!(
                        "option readiness_policy must be one of {}, not \"{}\"",
                        READINESS_POLICIES.join(", "),
                        excerpt(&policy)
                    )));
                }
                parsed.readiness_policy = policy;
            }
            other => {
                return Err(unknown_option(
                    other,
                    "target, stop_target, start, safety_snapshot, name, readiness_policy",
                ))
            }
        }
    }
    Ok(parsed)
}

fn restore_object_path(uuid: &str) -> Result<OwnedObjectPath, VmSnapError> {
    OwnedObjectPath::try_from(restore_path(uuid)).map_err(VmSnapError::ZBus)
}

#[interface(name = "org.vmsnap.VmSnap1.Manager")]
impl ManagerObject {
    /// Object path of the VM with this name or UUID.
    async fn find_vm(&self, name_or_uuid: String) -> Result<OwnedObjectPath, VmSnapError> {
        let uuid = ask(&self.engine, |reply| Request::FindVm {
            key: name_or_uuid,
            reply,
        })
        .await??;
        object_path(&uuid)
    }

    /// Paths of all VM objects, sorted by VM name.
    async fn list_vms(&self) -> Result<Vec<OwnedObjectPath>, VmSnapError> {
        let vms = ask(&self.engine, |reply| Request::ListVms { reply }).await?;
        vms.iter().map(|vm| object_path(&vm.uuid)).collect()
    }

    /// Starts a snapshot of a VM (name or UUID) and returns its object at once, in phase
    /// InProgress; completion shows as PropertiesChanged on it. Options: description (s),
    /// allow_excluded (b), failure_deadline_ms (t: this snapshot's failure deadline instead of
    /// the configured one; longer than freeze_timeout).
    async fn create_snapshot(
        &self,
        vm: String,
        name: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &zbus::Connection,
    ) -> Result<OwnedObjectPath, VmSnapError> {
        self.auth.check(connection, &header, ACTION_CREATE).await?;
        let options = create_options(options)?;
        let uuid = ask(&self.engine, |reply| Request::CreateSnapshot {
            vm,
            name,
            options,
            reply,
        })
        .await??;
        snapshot_object_path(&uuid)
    }

    /// Snapshots of one VM (name or UUID), or of all VMs when vm is empty, oldest first.
    async fn list_snapshots(&self, vm: String) -> Result<Vec<OwnedObjectPath>, VmSnapError> {
        let uuids = ask(&self.engine, |reply| Request::ListSnapshots { vm, reply }).await??;
        uuids.iter().map(|u| snapshot_object_path(u)).collect()
    }

    /// The snapshot called name of a VM (name or UUID).
    async fn find_snapshot(
        &self,
        vm: String,
        name: String,
    ) -> Result<OwnedObjectPath, VmSnapError> {
        let uuid = ask(&self.engine, |reply| Request::FindSnapshot {
            vm,
            name,
            reply,
        })
        .await??;
        snapshot_object_path(&uuid)
    }

    /// Restores a VM (name or UUID) to one of its snapshots; returns the restore object at
    /// once, in phase InProgress. Options: target (s: a new VM's name; empty restores in
    /// place), stop_target (b), start (b), safety_snapshot (b, default true), name (s: a name
    /// unique among restores), readiness_policy (s: for a VM that is not shut off,
    /// StopTarget, FailImmediate, WaitGracePeriod (wait in phase Waiting up to
    /// restore_grace_period for it to be shut off) or WaitEventually).
    async fn restore(
        &self,
        vm: String,
        snapshot: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &zbus::Connection,
    ) -> Result<OwnedObjectPath, VmSnapError> {
        self.auth.check(connection, &header, ACTION_RESTORE).await?;
        let options = restore_options(options)?;
        let uuid = ask(&self.engine, |reply| Request::Restore {
            vm,
            snapshot,
            options,
            reply,
        })
        .await??;
        restore_object_path(&uuid)
    }

    /// A snapshot's content record (JSON) for another host that shares its storage, to give to
    /// ImportSnapshot there: only a succeeded snapshot whose every disk is on Ceph RBD. The
    /// definition's secrets (graphics passwords) are left out, as in DomainXml.
    async fn export_snapshot(&self, vm: String, name: String) -> Result<String, VmSnapError> {
        Ok(ask(&self.engine, |reply| Request::ExportSnapshot {
            vm,
            name,
            reply,
        })
        .await??)
    }

    /// Takes in a snapshot another host exported (ExportSnapshot), once its cluster shows
    /// every RBD snapshot it names; returns the new snapshot object. Authorized as a create.
    async fn import_snapshot(
        &self,
        record: String,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &zbus::Connection,
    ) -> Result<OwnedObjectPath, VmSnapError> {
        self.auth.check(connection, &header, ACTION_CREATE).await?;
        let uuid = ask(&self.engine, |reply| Request::ImportSnapshot {
            record,
            reply,
        })
        .await??;
        snapshot_object_path(&uuid)
    }

    /// All restore objects, oldest first.
    async fn list_restores(&self) -> Result<Vec<OwnedObjectPath>, VmSnapError> {
        let uuids = ask(&self.engine, |reply| Request::ListRestores { reply }).await?;
        uuids.iter().map(|u| restore_object_path(u)).collect()
    }

    /// The snapshot objects of one VM (name or UUID), or of every VM when vm is empty, with
    /// their properties, as GetManagedObjects gives them: one call for a listing, whose size
    /// grows with what is listed only.
    async fn get_snapshot_objects(&self, vm: String) -> Result<Objects, VmSnapError> {
        let uuids = ask(&self.engine, |reply| Request::ListSnapshots { vm, reply }).await??;
        let registry = listing::read(&self.registry);
        // An object not exported yet, or removed since it was listed, is left out.
        Ok(Objects(
            uuids
                .iter()
                .filter_map(|uuid| registry.snapshots.get(uuid).cloned())
                .map(Listed::Snapshot)
                .collect(),
        ))
    }

    /// The snapshots of one VM (name or UUID), or of every VM when vm is empty, oldest first,
    /// each as one structure of all its Snapshot properties: (Name, Uuid, VmName, VmUuid,
    /// Description, Phase, ReadyToUse, CreationTime, Indications, SourceIndications,
    /// IncludedVolumes, ExcludedVolumes, Error, ErrorName, Progress, FreezeDurationMs,
    /// FrozenFilesystems, CowFillPercent). A third of GetSnapshotObjects' size, without a
    /// variant per property: what a listing of thousands reads.
    async fn get_snapshot_list(&self, vm: String) -> Result<SnapshotRows, VmSnapError> {
        let uuids = ask(&self.engine, |reply| Request::ListSnapshots { vm, reply }).await??;
        let registry = listing::read(&self.registry);
        // An object not exported yet, or removed since it was listed, is left out.
        Ok(SnapshotRows(
            uuids
                .iter()
                .filter_map(|uuid| registry.snapshots.get(uuid).cloned())
                .collect(),
        ))
    }

    /// Every restore object with its properties, as GetManagedObjects gives them: one call for
    /// a listing.
    async fn get_restore_objects(&self) -> Result<Objects, VmSnapError> {
        let uuids = ask(&self.engine, |reply| Request::ListRestores { reply }).await?;
        let registry = listing::read(&self.registry);
        Ok(Objects(
            uuids
                .iter()
                .filter_map(|uuid| registry.restores.get(uuid).cloned())
                .map(Listed::Restore)
                .collect(),
        ))
    }

    /// Every VM object with its properties, as GetManagedObjects gives them: one call for a
    /// listing (ListVms and one GetAll per VM otherwise).
    async fn get_vm_objects(&self) -> Result<Objects, VmSnapError> {
        let vms = ask(&self.engine, |reply| Request::ListVms { reply }).await?;
        let registry = listing::read(&self.registry);
        Ok(Objects(
            vms.iter()
                .filter_map(|vm| registry.vms.get(&vm.uuid).cloned())
                .map(Listed::Vm)
                .collect(),
        ))
    }

    /// vmsnapd's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// The libvirt URI vmsnapd uses.
    #[zbus(property(emits_changed_signal = "const"))]
    fn libvirt_uri(&self) -> String {
        self.libvirt_uri.clone()
    }

    /// Whether vmsnapd is connected to libvirt. While it is not, VM objects show their last known
    /// state.
    #[zbus(property)]
    fn libvirt_connected(&self) -> bool {
        self.libvirt_connected
    }

    /// Why libvirt is unavailable; empty while connected.
    #[zbus(property)]
    fn libvirt_error(&self) -> String {
        self.libvirt_error.clone()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use zbus::Variant;

    use super::*;

    fn value() -> impl Strategy<Value = OwnedVariant> {
        prop_oneof![
            any::<bool>().prop_map(OwnedVariant::from),
            any::<u32>().prop_map(OwnedVariant::from),
            any::<i64>().prop_map(OwnedVariant::from),
            ".{0,120}".prop_map(|s| OwnedVariant::try_from(Variant::from(s))
                .unwrap_or_else(|_| OwnedVariant::from(false))),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(|v| {
                OwnedVariant::try_from(Variant::from(v)).unwrap_or_else(|_| OwnedVariant::from(0u8))
            }),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "description",
                "allow_excluded",
                "target",
                "stop_target",
                "start",
                "safety_snapshot",
            ])
            .prop_map(str::to_string),
            ".{0,80}",
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzz_tests::config())]

        /// D-Bus option dicts of any keys, types and sizes: parsed or refused, never a panic,
        /// and a refusal never echoes more than a short excerpt.
        #[test]
        fn fuzz_option_dicts(options in prop::collection::hash_map(key(), value(), 0..24)) {
            let copy = || -> HashMap<String, OwnedVariant> {
                options
                    .iter()
                    .filter_map(|(k, v)| v.try_clone().ok().map(|v| (k.clone(), v)))
                    .collect()
            };
            let errors = [create_options(copy()).err(), restore_options(copy()).err()];
            for error in errors.into_iter().flatten() {
                // Bounded in characters (an excerpt is 64 of them, up to 4 bytes each).
                prop_assert!(error.to_string().chars().count() < 300, "{}", error);
            }
            if options.len() > MAX_OPTIONS {
                prop_assert!(create_options(copy()).is_err());
            }
        }
    }
}
