//! The RBD backend: disks on Ceph RBD images (`<disk type='network'>` with `<source
//! protocol='rbd'>`), through the `rbd` command (no maintained Rust binding of librbd exists),
//! each call with `--format json` where it reads and the configured timeout.
//!
//! libvirt cannot snapshot RBD disks, so a snapshot is vmsnapd's own `rbd snap create` inside
//! the same freeze as the VM's other disks. A snapshot's RBD snapshot is named
//! `vmsnap-<snapshot UUID>`: `rbd snap ls` shows which vmsnap snapshot it is, and only a name of
//! that form is ever removed.
//!
//! Restores clone (Ceph's clone v2: a new image backed by the snapshot, metadata only, so its
//! cost does not grow with the image's size) and point the disk at the clone, in place as for a
//! new VM; `rbd snap rollback` would rewrite every object of the image. The image the VM used
//! before stays as it is (its snapshots live in it). A delete removes the RBD snapshot; a
//! snapshot a clone still depends on is kept by Ceph in its trash until the last clone goes.
//!
//! The cluster is reached as the disk reaches it: the monitors and the Ceph user the definition
//! names, the user's key from the libvirt secret it names (given to `rbd` in a private key file,
//! never on a command line), and `[rbd] ceph_conf` for the rest.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tracing::{info, warn};
use vmsnap_api::{DiskBackend, DiskInfo, VolumeRestore};

use super::{Env, VolumeBackend};
use crate::disks::rbd_image;
use crate::ops::{OpError, OpResult};
use crate::store::{
    Artifact, PendingOrphanCheck, RbdVolume, RestoreRecord, SnapshotRecord, Store, VolumeRecord,
};

/// Prefix of the name of every RBD snapshot vmsnap makes.
pub const SNAP_PREFIX: &str = "vmsnap-";
/// What a restore's clone adds to the image's name, before the short restore UUID.
const RESTORE_SUFFIX: &str = "-vmsnap-r";

/// The `rbd` command for one cluster and user.
pub struct Rbd {
    conf: PathBuf,
    timeout: Duration,
    monitors: Vec<String>,
    user: String,
    /// The user's key, when it came from a libvirt secret (removed when dropped).
    keyfile: Option<tempfile::NamedTempFile>,
}

/// What `rbd info --format json` says of an image.
#[derive(Debug, Deserialize)]
pub struct ImageInfo {
    pub size: u64,
    #[serde(default)]
    pub parent: Option<Parent>,
}

#[derive(Debug, Deserialize)]
pub struct Parent {
    pub pool: String,
    #[serde(default)]
    pub pool_namespace: String,
    pub image: String,
    pub snapshot: String,
}

#[derive(Debug, Deserialize)]
struct SnapInfo {
    name: String,
}

impl Rbd {
    /// The `rbd` command as volume `v` reaches its cluster.
    fn for_volume(env: &Env, v: &RbdVolume) -> OpResult<Rbd> {
        let key = if v.secret.is_empty() {
            None
        } else {
            Some(secret_key(env, &v.secret)?)
        };
        Rbd::new(
            env.ctx.rbd.ceph_conf.clone(),
            env.ctx.rbd.command_timeout,
            v.monitors.clone(),
            v.user.clone(),
            key,
        )
    }

    pub fn new(
        conf: PathBuf,
        timeout: Duration,
        monitors: Vec<String>,
        user: String,
        key: Option<String>,
    ) -> OpResult<Rbd> {
        let keyfile = match key {
            None => None,
            Some(key) => {
                // Mode 0600 in the temporary folder: only root reads it, and it goes with `Rbd`.
                let mut file = tempfile::Builder::new()
                    .prefix("vmsnap-rbd-key.")
                    .tempfile()
                    .map_err(|e| OpError::Storage(format!("cannot write a Ceph key file: {e}")))?;
                file.write_all(key.as_bytes())
                    .and_then(|()| file.flush())
                    .map_err(|e| OpError::Storage(format!("cannot write a Ceph key file: {e}")))?;
                Some(file)
            }
        };
        Ok(Rbd {
            conf,
            timeout,
            monitors,
            user,
            keyfile,
        })
    }

    /// Runs `rbd ARGS`; its standard output, or its error in one line.
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, RbdError> {
        let mut command = Command::new("rbd");
        command.arg("--conf").arg(&self.conf);
        if !self.monitors.is_empty() {
            command.arg("--mon-host").arg(self.monitors.join(","));
        }
        if !self.user.is_empty() {
            command.arg("--id").arg(&self.user);
        }
        if let Some(keyfile) = &self.keyfile {
            command.arg("--keyfile").arg(keyfile.path());
        }
        command.args(args);
        let what = format!("rbd {}", args.join(" "));
        match vmsnap_exec::run_bounded(&mut command, self.timeout) {
            Err(vmsnap_exec::RunError::Spawn(e)) => {
                Err(RbdError::Failed(format!("cannot run {what}: {e}")))
            }
            Err(vmsnap_exec::RunError::TimedOut) => Err(RbdError::Failed(format!(
                "{what} did not finish within {:?} (is the Ceph cluster reachable?)",
                self.timeout
            ))),
            Ok(done) if done.status.success() => Ok(done.stdout),
            Ok(done) => {
                let message = one_line(&String::from_utf8_lossy(&done.stderr));
                // rbd exits with ENOENT (2) for an image or snapshot that is not there.
                if done.status.code() == Some(2) {
                    Err(RbdError::NotFound(format!("{what}: {message}")))
                } else {
                    Err(RbdError::Failed(format!("{what}: {message}")))
                }
            }
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T, RbdError> {
        let mut with_format = args.to_vec();
        with_format.extend(["--format", "json"]);
        let out = self.run(&with_format)?;
        serde_json::from_slice(&out).map_err(|e| {
            RbdError::Failed(format!(
                "rbd {}: unreadable answer: {e}",
                with_format.join(" ")
            ))
        })
    }

    /// The image `spec`, or None when there is none of that name.
    pub fn info(&self, spec: &str) -> Result<Option<ImageInfo>, String> {
        match self.json(&["info", spec]) {
            Ok(info) => Ok(Some(info)),
            Err(RbdError::NotFound(_)) => Ok(None),
            Err(RbdError::Failed(e)) => Err(e),
        }
    }

    /// The names of image `spec`'s snapshots (those of the user namespace).
    pub fn snaps(&self, spec: &str) -> Result<Vec<String>, String> {
        let snaps: Vec<SnapInfo> = self.json(&["snap", "ls", spec]).map_err(String::from)?;
        Ok(snaps.into_iter().map(|s| s.name).collect())
    }

    pub fn snap_create(&self, snap_spec: &str) -> Result<(), String> {
        self.run(&["snap", "create", "--no-progress", snap_spec])
            .map(|_| ())
            .map_err(String::from)
    }

    /// Removes a snapshot; one already gone is fine.
    pub fn snap_remove(&self, snap_spec: &str) -> Result<(), String> {
        match self.run(&["snap", "rm", "--no-progress", snap_spec]) {
            Ok(_) | Err(RbdError::NotFound(_)) => Ok(()),
            Err(RbdError::Failed(e)) => Err(e),
        }
    }

    /// Whether image `spec` has any snapshot, in any namespace (Ceph's trash included: a
    /// removed snapshot a clone still reads from).
    pub fn has_any_snap(&self, spec: &str) -> Result<bool, String> {
        let snaps: Vec<serde_json::Value> = self
            .json(&["snap", "ls", "--all", spec])
            .map_err(String::from)?;
        Ok(!snaps.is_empty())
    }

    /// Whether a client has image `spec` open (a watcher: a running QEMU, a mapped device).
    pub fn is_open(&self, spec: &str) -> Result<bool, String> {
        let status: serde_json::Value = self.json(&["status", spec]).map_err(String::from)?;
        Ok(status["watchers"].as_array().is_none_or(|w| !w.is_empty()))
    }

    pub fn clone_snap(&self, snap_spec: &str, to_spec: &str) -> Result<(), String> {
        self.run(&["clone", snap_spec, to_spec])
            .map(|_| ())
            .map_err(String::from)
    }

    /// Removes an image; one already gone is fine.
    pub fn remove(&self, spec: &str) -> Result<(), String> {
        match self.run(&["rm", "--no-progress", spec]) {
            Ok(_) | Err(RbdError::NotFound(_)) => Ok(()),
            Err(RbdError::Failed(e)) => Err(e),
        }
    }
}

enum RbdError {
    NotFound(String),
    Failed(String),
}

impl From<RbdError> for String {
    fn from(e: RbdError) -> String {
        match e {
            RbdError::NotFound(m) | RbdError::Failed(m) => m,
        }
    }
}

/// The last meaningful line of a command's error output (rbd prefixes its own with a date).
fn one_line(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("failed without a message");
    vmsnap_api::excerpt(line)
}

/// The key of the Ceph user in libvirt secret `uuid`, as Ceph's key files hold it (base64).
fn secret_key(env: &Env, uuid: &str) -> OpResult<String> {
    let conn = env.host.libvirt().ok_or_else(|| {
        OpError::Refused("RBD disks with a libvirt secret need a libvirt host".to_string())
    })?;
    let secrets = conn
        .list_all_secrets(0)
        .map_err(|e| OpError::Libvirt(format!("cannot list libvirt's secrets: {}", e.message())))?;
    let secret = secrets
        .into_iter()
        .find(|s| s.uuid_string().is_ok_and(|u| u.eq_ignore_ascii_case(uuid)))
        .ok_or_else(|| {
            OpError::Refused(format!(
                "the libvirt secret {} the RBD disk names is not defined",
                vmsnap_api::excerpt(uuid)
            ))
        })?;
    let value = secret.value(0).map_err(|e| {
        OpError::Refused(format!(
            "cannot read the libvirt secret {uuid} (a private secret cannot be read back; put the key in a keyring that {} lists instead): {}",
            "[rbd] ceph_conf",
            e.message()
        ))
    })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(value))
}

/// How the definition's disk `target` reaches its cluster: monitors (`host:port`), the Ceph
/// user and the secret's UUID.
fn disk_access(live_xml: &str, target: &str) -> Result<(Vec<String>, String, String), String> {
    let doc =
        roxmltree::Document::parse(live_xml).map_err(|e| format!("unreadable domain XML: {e}"))?;
    let disk = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children()
                .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
        })
        .ok_or_else(|| format!("disk {target} is not in the definition"))?;
    let source = disk
        .children()
        .find(|c| c.has_tag_name("source"))
        .ok_or_else(|| format!("disk {target} has no source"))?;
    let mut monitors = Vec::new();
    for host in source.children().filter(|c| c.has_tag_name("host")) {
        let name = host.attribute("name").unwrap_or("");
        let port = host.attribute("port").unwrap_or("6789");
        let fine = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
            && port.parse::<u16>().is_ok();
        if !fine {
            return Err(format!(
                "disk {target}: a monitor host is not a host name or address"
            ));
        }
        // An IPv6 address needs its brackets for rbd's host:port.
        if name.contains(':') && !name.starts_with('[') {
            monitors.push(format!("[{name}]:{port}"));
        } else {
            monitors.push(format!("{name}:{port}"));
        }
    }
    // libvirt allows <auth> inside <source> (current) or beside it (older definitions).
    let auth = source
        .children()
        .chain(disk.children())
        .find(|c| c.has_tag_name("auth"));
    let user = auth.and_then(|a| a.attribute("username")).unwrap_or("");
    let secret = auth
        .and_then(|a| a.children().find(|c| c.has_tag_name("secret")))
        .and_then(|s| s.attribute("uuid"))
        .unwrap_or("");
    let name_ok = |s: &str, extra: &[char]| {
        s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
    };
    if !name_ok(user, &['-', '.']) || user.starts_with('-') {
        return Err(format!("disk {target}: the Ceph user name is not one"));
    }
    if !name_ok(secret, &['-']) {
        return Err(format!("disk {target}: the secret is not a UUID"));
    }
    Ok((monitors, user.to_string(), secret.to_string()))
}

/// Checks an RBD volume of a record from another host, field by field, as `plan` would have
/// made it: pool, namespace, image and snapshot names, monitors, user and secret.
pub fn check_portable(target: &str, image: &str, v: &RbdVolume) -> Result<(), String> {
    let fail = |what: &str| Err(format!("disk {}: {what}", vmsnap_api::excerpt(target)));
    let spec = format!("rbd:{}", v.image_spec());
    match rbd_image(&spec) {
        Some((pool, ns, name))
            if pool == v.pool && ns == v.namespace.as_deref() && name == v.image_name => {}
        _ => return fail("the RBD image is not POOL/[NAMESPACE/]IMAGE"),
    }
    let uuid = v.snap.strip_prefix(SNAP_PREFIX).unwrap_or("");
    if uuid::Uuid::parse_str(uuid).is_err() {
        return fail("the RBD snapshot is not one vmsnap names");
    }
    if image != format!("rbd:{}", v.snap_spec()) {
        return fail("the image does not name the RBD snapshot");
    }
    let host_ok = |m: &str| {
        let (host, port) = m.rsplit_once(':').unwrap_or((m, ""));
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
            && port.parse::<u16>().is_ok()
    };
    if !v.monitors.iter().all(|m| host_ok(m)) || v.monitors.len() > 16 {
        return fail("a monitor is not HOST:PORT");
    }
    let name_ok = |s: &str, extra: &[char]| {
        s.len() <= 128
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
    };
    if !name_ok(&v.user, &['-', '.']) {
        return fail("the Ceph user name is not one");
    }
    if !name_ok(&v.secret, &['-']) {
        return fail("the secret is not a UUID");
    }
    Ok(())
}

/// The RBD snapshot name of vmsnap snapshot `uuid`.
fn snap_name(snapshot_uuid: &str) -> String {
    format!("{SNAP_PREFIX}{snapshot_uuid}")
}

fn rbd_of(volume: &VolumeRecord) -> OpResult<&RbdVolume> {
    volume
        .rbd()
        .ok_or_else(|| OpError::Refused(format!("disk {} is not on RBD", volume.target)))
}

/// Whether `volume`'s RBD snapshot is there.
fn is_taken(rbd: &Rbd, v: &RbdVolume) -> Result<bool, String> {
    match rbd.snaps(&v.image_spec()) {
        Ok(snaps) => Ok(snaps.contains(&v.snap)),
        Err(e) => Err(e),
    }
}

/// The snapshots of `v`'s image, reached as `v` reaches its cluster.
pub fn snaps_of(env: &Env, v: &RbdVolume) -> Result<Vec<String>, String> {
    Rbd::for_volume(env, v)
        .map_err(|e| e.to_string())?
        .snaps(&v.image_spec())
}

/// Removes `volume`'s RBD snapshot if it is one vmsnap made.
fn remove_snap(rbd: &Rbd, v: &RbdVolume) -> Result<(), String> {
    if !v.snap.starts_with(SNAP_PREFIX) {
        return Err(format!("{} is not a vmsnap snapshot", v.snap_spec()));
    }
    rbd.snap_remove(&v.snap_spec())
}

/// Ceph RBD images: RBD snapshots, restored by clones.
pub struct RbdBackend;

impl VolumeBackend for RbdBackend {
    fn name(&self) -> &'static str {
        "rbd"
    }

    fn takes(&self, disk: &DiskInfo) -> bool {
        disk.backend == DiskBackend::Rbd.as_str()
    }

    fn owns(&self, volume: &VolumeRecord) -> bool {
        volume.rbd().is_some()
    }

    fn plan(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        live_xml: &str,
        disk: &DiskInfo,
    ) -> OpResult<VolumeRecord> {
        let (pool, namespace, image) = rbd_image(&disk.source).ok_or_else(|| {
            OpError::Refused(format!(
                "disk {}: {} is not an RBD image",
                disk.target, disk.source
            ))
        })?;
        let (monitors, user, secret) =
            disk_access(live_xml, &disk.target).map_err(OpError::Refused)?;
        let volume = RbdVolume {
            pool: pool.to_string(),
            namespace: namespace.map(str::to_string),
            image_name: image.to_string(),
            snap: snap_name(&snapshot.uuid),
            monitors,
            user,
            secret,
        };
        let rbd = Rbd::for_volume(env, &volume)?;
        let fail = |e: String| OpError::Storage(format!("disk {}: {e}", disk.target));
        let info = rbd
            .info(&volume.image_spec())
            .map_err(fail)?
            .ok_or_else(|| {
                OpError::Refused(format!(
                    "disk {}: the RBD image {} does not exist",
                    disk.target,
                    volume.image_spec()
                ))
            })?;
        if is_taken(&rbd, &volume).map_err(fail)? {
            return Err(OpError::Refused(format!(
                "disk {}: {} already exists",
                disk.target,
                volume.snap_spec()
            )));
        }
        Ok(VolumeRecord {
            target: disk.target.clone(),
            image: format!("rbd:{}", volume.snap_spec()),
            virtual_size: info.size,
            artifact: Artifact::Rbd(volume),
        })
    }

    fn capture(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volumes: &[VolumeRecord],
        _disks: &[DiskInfo],
    ) -> OpResult<()> {
        let mut clients = Vec::with_capacity(volumes.len());
        for volume in volumes {
            let v = rbd_of(volume)?;
            clients.push((volume, v, Rbd::for_volume(env, v)?));
        }
        // Inside the freeze: every disk's `rbd snap create` (a few hundred ms each) at once.
        let results: Vec<OpResult<()>> = std::thread::scope(|scope| {
            let running: Vec<_> = clients
                .iter()
                .map(|(volume, v, rbd)| {
                    scope.spawn(move || {
                        rbd.snap_create(&v.snap_spec())
                            .map_err(|e| OpError::Storage(format!("disk {}: {e}", volume.target)))
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(OpError::Storage("an rbd call panicked".to_string()))
                    })
                })
                .collect()
        });
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            // All or none: those that were taken go again.
            self.discard(env, snapshot, volumes);
            return Err(e);
        }
        Ok(())
    }

    fn is_captured(
        &self,
        env: &Env,
        _snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<bool> {
        let v = rbd_of(volume)?;
        is_taken(&Rbd::for_volume(env, v)?, v)
            .map_err(|e| OpError::Storage(format!("disk {}: {e}", volume.target)))
    }

    fn undo(&self, env: &Env, snapshot: &SnapshotRecord, volumes: &[VolumeRecord]) {
        self.discard(env, snapshot, volumes);
    }

    fn discard(&self, env: &Env, _snapshot: &SnapshotRecord, volumes: &[VolumeRecord]) {
        for volume in volumes {
            let Some(v) = volume.rbd() else { continue };
            let removed = Rbd::for_volume(env, v)
                .map_err(|e| e.to_string())
                .and_then(|rbd| remove_snap(&rbd, v));
            if let Err(e) = removed {
                warn!(disk = %volume.target, error = %e, "cannot remove an RBD snapshot");
            }
        }
    }

    fn check_intact(
        &self,
        env: &Env,
        snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<()> {
        let v = rbd_of(volume)?;
        let rbd = Rbd::for_volume(env, v)?;
        match is_taken(&rbd, v) {
            Ok(true) => Ok(()),
            Ok(false) => Err(OpError::Refused(format!(
                "snapshot '{}' cannot be restored: its RBD snapshot {} of disk {} is missing",
                snapshot.name,
                v.snap_spec(),
                volume.target
            ))),
            Err(e) => Err(OpError::Storage(format!("disk {}: {e}", volume.target))),
        }
    }

    fn release(
        &self,
        env: &Env,
        deleting: &mut SnapshotRecord,
        others: &mut [Arc<SnapshotRecord>],
        volume: &VolumeRecord,
        _deadline: std::time::Instant,
    ) -> OpResult<()> {
        let v = rbd_of(volume)?;
        // Its last snapshot gone, an image an earlier restore replaced may be needed by nothing:
        // that check is owed from the snapshot's removal on, and recorded first, so that a check
        // that cannot be made (or a crash) leaves it to a retry rather than to an admin. Only a
        // restore's clone is ever removed, so only a clone is recorded.
        let owed = is_restore_clone_name(&v.image_name)
            .then(|| PendingOrphanCheck::new(v.image_spec(), &deleting.vm_uuid, v));
        if let Some(check) = &owed {
            env.ctx.store.save_pending_check(check).map_err(|e| {
                OpError::RecordWrite(format!(
                    "cannot record the pending check of the RBD image {}: {e}",
                    check.image_spec
                ))
            })?;
        }
        env.ctx.progress(
            deleting,
            format!("removing the RBD snapshot of disk {}", volume.target),
        );
        remove_snap(&Rbd::for_volume(env, v)?, v)
            .map_err(|e| OpError::Storage(format!("disk {}: {e}", volume.target)))?;
        env.ctx.faults.point(BEFORE_ORPHAN_CHECK);
        let answered = match &owed {
            Some(check) => conclude(
                &env.ctx.store,
                check,
                remove_if_orphaned(env, v, &check.image_spec, &deleting.vm_uuid, others),
            ),
            None => true,
        };
        // The cluster answers: the checks of this VM's images that earlier operations could
        // not make are made now (another VM's wait for an operation of that VM: one per VM),
        // against every record now, this one included (still on disk, it names its images).
        if answered {
            let mut records = others.to_vec();
            records.push(Arc::new(deleting.clone()));
            retry_pending_checks(env, &deleting.vm_uuid, &records);
        }
        Ok(())
    }

    /// A clone of the snapshot, in the image's pool: named after the image in place (the
    /// suffix of an earlier restore replaced), after the new VM and disk otherwise.
    fn plan_restore(
        &self,
        restore: &RestoreRecord,
        volume: &VolumeRecord,
    ) -> OpResult<VolumeRestore> {
        let v = rbd_of(volume)?;
        let name = clone_name(v, restore, &volume.target);
        if rbd_image(&format!("rbd:{}", v.spec_of(&name))).is_none() {
            return Err(OpError::Refused(format!(
                "disk {}: the restored image's name {name} is not one RBD takes (at most 128 letters, digits, '-', '_' and '.')",
                volume.target
            )));
        }
        Ok(VolumeRestore {
            target: volume.target.clone(),
            from_image: volume.image.clone(),
            to_image: format!("rbd:{}", v.spec_of(&name)),
        })
    }

    fn check_restore_target(
        &self,
        _env: &Env,
        _new_vm: bool,
        _volume: &VolumeRecord,
    ) -> OpResult<()> {
        // A clone changes nothing the VM uses; the clone's name is checked when it is made.
        Ok(())
    }

    fn stage_restore(
        &self,
        env: &Env,
        _restore: &RestoreRecord,
        volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> OpResult<()> {
        let v = rbd_of(volume)?;
        let rbd = Rbd::for_volume(env, v)?;
        let to = planned.to_image.trim_start_matches("rbd:");
        let fail = |e: String| OpError::Storage(format!("disk {}: {e}", volume.target));
        match rbd.info(to).map_err(fail)? {
            // Made by this restore before a restart: its parent is this snapshot.
            Some(info) if is_clone_of(&info, v) => Ok(()),
            Some(_) => Err(OpError::Refused(format!(
                "disk {}: the RBD image {to} already exists",
                volume.target
            ))),
            None => rbd.clone_snap(&v.snap_spec(), to).map_err(fail),
        }
    }

    fn restored_source(
        &self,
        _new_vm: bool,
        _volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> Option<(String, &'static str)> {
        Some((
            planned.to_image.trim_start_matches("rbd:").to_string(),
            "raw",
        ))
    }

    /// The image the VM used before an in-place restore goes if nothing needs it (see
    /// [`remove_if_orphaned`]); the cluster is reached as the records' volumes in its pool do.
    fn release_replaced(
        &self,
        env: &Env,
        source: &str,
        records: &[Arc<SnapshotRecord>],
    ) -> OpResult<()> {
        let Some(spec) = source.strip_prefix("rbd:") else {
            return Ok(());
        };
        let Some((pool, _, name)) = rbd_image(source) else {
            return Ok(());
        };
        // Only a restore's clone is ever removed: nothing to check for anything else.
        if !is_restore_clone_name(name) {
            return Ok(());
        }
        // The restored VM is the operation's; the cluster is reached as its records' volumes in
        // that pool reach it (any record's, else).
        let vm = env.ctx.vm_uuid();
        let in_pool = |r: &Arc<SnapshotRecord>| {
            r.volumes
                .iter()
                .find_map(|v| v.rbd().filter(|rv| rv.pool == pool))
                .map(|rv| (r.vm_uuid.clone(), rv.clone()))
        };
        let found = records
            .iter()
            .filter(|r| *r.vm_uuid == *vm)
            .find_map(in_pool)
            .or_else(|| records.iter().find_map(in_pool));
        let Some((record_vm, access)) = found else {
            return Ok(());
        };
        let vm_uuid = if vm.is_empty() { &*record_vm } else { vm };
        // Past the restore's point of no return: a check that cannot be recorded is still made
        // (it only goes unretried, as before pending checks were recorded).
        let check = PendingOrphanCheck::new(spec.to_string(), vm_uuid, &access);
        if let Err(e) = env.ctx.store.save_pending_check(&check) {
            warn!(image = %spec, error = %e, "cannot record the pending check of a replaced image; checking it once");
        }
        conclude(
            &env.ctx.store,
            &check,
            remove_if_orphaned(env, &access, spec, vm_uuid, records),
        );
        Ok(())
    }

    fn retry_pending_checks(&self, env: &Env, vm_uuid: &str, records: &[Arc<SnapshotRecord>]) {
        retry_pending_checks(env, vm_uuid, records);
    }

    /// Only the restore's own clone: an image of that name whose parent is the snapshot.
    fn discard_restored(
        &self,
        env: &Env,
        _restore: &RestoreRecord,
        volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) {
        let Some(v) = volume.rbd() else { return };
        let to = planned.to_image.trim_start_matches("rbd:");
        let removed = Rbd::for_volume(env, v)
            .map_err(|e| e.to_string())
            .and_then(|rbd| match rbd.info(to)? {
                Some(info) if is_clone_of(&info, v) => rbd.remove(to),
                _ => Ok(()),
            });
        if let Err(e) = removed {
            warn!(image = %to, error = %e, "cannot remove a restore's RBD clone");
        }
    }
}

/// The name of the image a restore clones from `v`'s snapshot for disk `target`.
fn clone_name(v: &RbdVolume, restore: &RestoreRecord, target: &str) -> String {
    let short = restore.uuid.get(..8).unwrap_or(&restore.uuid);
    if restore.new_vm {
        format!("{}-{target}{RESTORE_SUFFIX}{short}", restore.target_name)
    } else {
        let base = match v.image_name.rfind(RESTORE_SUFFIX) {
            Some(at) if v.image_name.len() - at == RESTORE_SUFFIX.len() + 8 => &v.image_name[..at],
            _ => v.image_name.as_str(),
        };
        format!("{base}{RESTORE_SUFFIX}{short}")
    }
}

/// Whether `name` is an image a restore of vmsnap made (`...-vmsnap-r<8 hex>`).
fn is_restore_clone_name(name: &str) -> bool {
    name.rsplit_once(RESTORE_SUFFIX)
        .is_some_and(|(base, short)| {
            !base.is_empty() && short.len() == 8 && short.chars().all(|c| c.is_ascii_hexdigit())
        })
}

/// Removes image `spec` (reached as `access` reaches its cluster) if nothing needs it any
/// more: a clone a vmsnap restore made (by its name, and its parent being a vmsnap snapshot)
/// that no record names, with no snapshot left (Ceph's trash included), that no client has
/// open and that is not a disk of VM `vm_uuid` now. Anything else stays: vmsnap never removes
/// an image it did not make. Returns whether it was removed.
fn remove_if_orphaned(
    env: &Env,
    access: &RbdVolume,
    spec: &str,
    vm_uuid: &str,
    records: &[Arc<SnapshotRecord>],
) -> Result<bool, String> {
    let source = format!("rbd:{spec}");
    let Some((_, _, name)) = rbd_image(&source) else {
        return Ok(false);
    };
    if !is_restore_clone_name(name) {
        return Ok(false);
    }
    let named = records.iter().any(|r| {
        r.volumes
            .iter()
            .any(|v| v.rbd().is_some_and(|rv| rv.image_spec() == spec))
    });
    let stays = |why: &str| {
        info!(image = %spec, "a replaced restore image stays: {why}");
        Ok(false)
    };
    if named {
        return stays("a snapshot record names it");
    }
    // The VM's definitions now (a restore back onto this image, an admin's edit). One that
    // cannot be read is no answer: the image stays and the check is owed still.
    let unreadable = |e: OpError| format!("cannot read the VM's definition: {e}");
    let in_use = |xml: Result<String, OpError>| {
        xml.map(|x| {
            x.contains(&format!("name='{spec}'")) || x.contains(&format!("name=\"{spec}\""))
        })
        .map_err(unreadable)
    };
    if env.host.exists(vm_uuid).map_err(unreadable)?
        && (in_use(env.host.definition(vm_uuid))? || in_use(env.host.current_definition(vm_uuid))?)
    {
        return stays("the VM's definition names it");
    }
    let rbd = Rbd::for_volume(env, access).map_err(|e| e.to_string())?;
    let Some(info) = rbd.info(spec)? else {
        return stays("it is not there");
    };
    // A clone of a vmsnap snapshot; one deleted since lives on in Ceph's trash, renamed to a
    // UUID of Ceph's own.
    let made_by_vmsnap = info.parent.as_ref().is_some_and(|p| {
        p.snapshot.starts_with(SNAP_PREFIX) || uuid::Uuid::parse_str(&p.snapshot).is_ok()
    });
    if !made_by_vmsnap {
        return stays("it is not a clone of a vmsnap snapshot");
    }
    if rbd.has_any_snap(spec)? {
        return stays("snapshots live in it");
    }
    if rbd.is_open(spec)? {
        return stays("a client has it open");
    }
    rbd.remove(spec)?;
    Ok(true)
}

/// The crash and pause point between a delete's RBD snapshot removal and the orphan check of
/// its image (`VMSNAP_TEST_CRASH_AT`, `VMSNAP_TEST_PAUSE_AT`).
pub const BEFORE_ORPHAN_CHECK: &str = "rbd-before-orphan-check";

/// Ends a pending check with `result`, a check of `check`'s image: an answer (removed, or it
/// stays for a reason) drops the entry; an error keeps it for a retry. Whether it answered.
fn conclude(store: &Store, check: &PendingOrphanCheck, result: Result<bool, String>) -> bool {
    let spec = &check.image_spec;
    match result {
        Ok(removed) => {
            if removed {
                info!(image = %spec, "removed a replaced restore image nothing needs any more");
            }
            if let Err(e) = store.remove_pending_check(spec) {
                // Harmless: the next retry finds the same answer.
                warn!(image = %spec, error = %e, "cannot drop a pending RBD orphan check");
            }
            true
        }
        Err(e) => {
            warn!(image = %spec, error = %e, "cannot tell whether a replaced image is still needed; it stays, checked again after the next RBD delete or start");
            false
        }
    }
}

/// Makes the pending checks of VM `vm_uuid`'s images, each with `check`, and concludes each;
/// a file that is not a pending check is named and left alone. Goes on past an error (another
/// image may be on another cluster). How many were answered.
fn settle_pending_checks(
    store: &Store,
    vm_uuid: &str,
    mut check: impl FnMut(&PendingOrphanCheck) -> Result<bool, String>,
) -> usize {
    let (pending, problems) = store.load_pending_checks();
    for problem in problems {
        warn!("skipping a pending RBD orphan check: {problem}");
    }
    pending
        .iter()
        .filter(|p| p.vm_uuid == vm_uuid)
        .filter(|p| conclude(store, p, check(p)))
        .count()
}

/// Retries the pending orphan checks of VM `vm_uuid`'s images (on an operation of that VM)
/// against `records`, the records now: an image a record names again stays.
fn retry_pending_checks(env: &Env, vm_uuid: &str, records: &[Arc<SnapshotRecord>]) {
    settle_pending_checks(&env.ctx.store, vm_uuid, |p| {
        remove_if_orphaned(env, &p.access, &p.image_spec, &p.vm_uuid, records)
    });
}

/// Whether image `info` is a clone of `v`'s snapshot.
fn is_clone_of(info: &ImageInfo, v: &RbdVolume) -> bool {
    info.parent.as_ref().is_some_and(|p| {
        p.pool == v.pool
            && p.pool_namespace == v.namespace.clone().unwrap_or_default()
            && p.image == v.image_name
            && p.snapshot == v.snap
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain><devices>\
        <disk type='network' device='disk'><driver name='qemu' type='raw'/>\
        <auth username='libvirt'><secret type='ceph' uuid='0a5f9e61-4c8f-4a7e-9d0e-3c2b1a000001'/></auth>\
        <source protocol='rbd' name='rbd/vm1'><host name='127.0.0.1' port='6789'/><host name='::1'/></source>\
        <target dev='vdb' bus='virtio'/></disk></devices></domain>";

    #[test]
    fn the_disk_names_its_monitors_user_and_secret() {
        let (monitors, user, secret) = disk_access(XML, "vdb").expect("reads");
        assert_eq!(monitors, ["127.0.0.1:6789", "[::1]:6789"]);
        assert_eq!(user, "libvirt");
        assert_eq!(secret, "0a5f9e61-4c8f-4a7e-9d0e-3c2b1a000001");
        assert!(disk_access(XML, "vdz").is_err());
        let hostile = XML.replace("127.0.0.1", "1.2.3.4 --keyring=/etc/shadow");
        assert!(disk_access(&hostile, "vdb").is_err());
        let hostile = XML.replace("username='libvirt'", "username='--conf=/x'");
        assert!(disk_access(&hostile, "vdb").is_err());
    }

    #[test]
    fn a_volume_from_another_host_is_checked_field_by_field() {
        let mut v = match volume().artifact {
            Artifact::Rbd(v) => v,
            _ => unreachable!(),
        };
        v.snap = "vmsnap-0a5f9e61-4c8f-4a7e-9d0e-3c2b1a000001".into();
        v.monitors = vec!["127.0.0.1:6789".into(), "[::1]:3300".into()];
        v.user = "libvirt".into();
        let image = format!("rbd:{}", v.snap_spec());
        assert_eq!(check_portable("vda", &image, &v), Ok(()));
        let bad = |change: &dyn Fn(&mut RbdVolume)| {
            let mut w = v.clone();
            change(&mut w);
            let image = format!("rbd:{}", w.snap_spec());
            check_portable("vda", &image, &w).is_err()
        };
        assert!(bad(&|w| w.pool = "../etc".into()));
        assert!(bad(&|w| w.image_name = "a b".into()));
        assert!(bad(&|w| w.snap = "mine".into()));
        assert!(bad(&|w| w.monitors = vec!["1.2.3.4 --keyring=/x:1".into()]));
        assert!(bad(&|w| w.user = "--id".into()));
        assert!(bad(&|w| w.namespace = Some(String::new())));
        assert!(check_portable("vda", "rbd:other/x@y", &v).is_err());
    }

    #[test]
    fn only_images_a_restore_made_are_ever_removed() {
        assert!(is_restore_clone_name("vm1-vmsnap-r0123abcd"));
        assert!(is_restore_clone_name("clone-vda-vmsnap-rfedcba98"));
        for user_image in [
            "vm1",
            "vm1-vmsnap-r",
            "vm1-vmsnap-r0123",
            "-vmsnap-r0123abcd",
            "vm1-vmsnap-rxyzxyzxy",
        ] {
            assert!(!is_restore_clone_name(user_image), "{user_image}");
        }
    }

    #[test]
    fn one_line_keeps_the_last_message() {
        assert_eq!(
            one_line("2026-11-29T10:00 7f err\nrbd: error opening image vm1: (2) No such file or directory\n\n"),
            "rbd: error opening image vm1: (2) No such file or directory"
        );
        assert_eq!(one_line(""), "failed without a message");
    }

    fn volume() -> VolumeRecord {
        VolumeRecord {
            target: "vdb".into(),
            image: "rbd:rbd/vm1@vmsnap-x".into(),
            virtual_size: 1 << 30,
            artifact: Artifact::Rbd(RbdVolume {
                pool: "rbd".into(),
                namespace: None,
                image_name: "vm1-vmsnap-r0123abcd".into(),
                snap: "vmsnap-x".into(),
                monitors: vec![],
                user: String::new(),
                secret: String::new(),
            }),
        }
    }

    fn access() -> RbdVolume {
        RbdVolume {
            pool: "rbd".into(),
            namespace: None,
            image_name: "vm1-vmsnap-r0123abcd".into(),
            snap: "vmsnap-0a5f9e61-4c8f-4a7e-9d0e-3c2b1a000001".into(),
            monitors: vec!["127.0.0.1:6789".into()],
            user: "libvirt".into(),
            secret: "0a5f9e61-4c8f-4a7e-9d0e-3c2b1a000002".into(),
        }
    }

    const VM: &str = "0a5f9e61-4c8f-4a7e-9d0e-3c2b1a0000aa";

    fn pending(image: &str, vm: &str) -> PendingOrphanCheck {
        PendingOrphanCheck::new(format!("rbd/{image}"), vm, &access())
    }

    /// Each check made once per settle, with the answers given by image name.
    fn settle(store: &Store, answers: &[(&str, Result<bool, String>)]) -> (usize, Vec<String>) {
        let mut asked = Vec::new();
        let answered = settle_pending_checks(store, VM, |p| {
            asked.push(p.image_spec.clone());
            answers
                .iter()
                .find(|(image, _)| p.image_spec == format!("rbd/{image}"))
                .map_or(Err("no answer".to_string()), |(_, a)| a.clone())
        });
        (answered, asked)
    }

    #[test]
    fn a_pending_check_is_dropped_on_an_answer_and_kept_on_an_error_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        let entries = [
            pending("a-vmsnap-r00000001", VM),
            pending("b-vmsnap-r00000002", VM),
            pending("c-vmsnap-r00000003", VM),
            pending("d-vmsnap-r00000004", "0a5f9e61-4c8f-4a7e-9d0e-3c2b1a0000bb"),
        ];
        for entry in &entries {
            store.save_pending_check(entry).expect("saved");
        }
        // Recorded again (a resumed delete): still one entry.
        store.save_pending_check(&entries[0]).expect("saved");
        // A restart: a new store on the same folder reads the same list.
        let restarted = Store::new(dir.path());
        let (loaded, problems) = restarted.load_pending_checks();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(loaded, entries);

        // Removed, stays for a reason, the cluster did not answer; another VM's untouched.
        let (answered, asked) = settle(
            &restarted,
            &[
                ("a-vmsnap-r00000001", Ok(true)),
                ("b-vmsnap-r00000002", Ok(false)),
                ("c-vmsnap-r00000003", Err("timed out".into())),
            ],
        );
        assert_eq!(answered, 2);
        assert_eq!(asked.len(), 3, "only this VM's: {asked:?}");
        let left = Store::new(dir.path()).load_pending_checks().0;
        assert_eq!(left, [entries[2].clone(), entries[3].clone()]);

        // The next retry makes the check kept; an answer drops it.
        let (answered, asked) = settle(&store, &[("c-vmsnap-r00000003", Ok(true))]);
        assert_eq!((answered, asked.len()), (1, 1));
        assert_eq!(store.load_pending_checks().0, [entries[3].clone()]);
        // No temporary files stay behind.
        let folder = dir.path().join("rbd-orphan-checks");
        let names: Vec<String> = std::fs::read_dir(&folder)
            .expect("folder")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["rbd@d-vmsnap-r00000004.json"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(folder.join(&names[0]))
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_file_that_is_not_a_pending_check_is_named_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        let good = pending("a-vmsnap-r00000001", VM);
        store.save_pending_check(&good).expect("saved");
        let folder = dir.path().join("rbd-orphan-checks");
        let json = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut value = serde_json::to_value(pending("x-vmsnap-r00000009", VM)).expect("json");
            change(&mut value);
            serde_json::to_vec(&value).expect("json")
        };
        let bad: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "rbd@x-vmsnap-r00000009.json",
                b"{not json".to_vec(),
                "key must be a string",
            ),
            ("notes.txt", b"hello".to_vec(), "expected value"),
            (
                "rbd@y-vmsnap-r0000000a.json",
                json(&|v| v["version"] = 2.into()),
                "format version 2 is newer",
            ),
            (
                "rbd@z-vmsnap-r0000000b.json",
                json(&|v| v["extra"] = "?".into()),
                "unknown field `extra`",
            ),
            (
                "rbd@w-vmsnap-r0000000c.json",
                json(&|_| {}),
                "not the one its file name says",
            ),
            (
                "other@x-vmsnap-r00000009.json",
                json(&|v| v["imageSpec"] = "other/x-vmsnap-r00000009".into()),
                "not an RBD image of the pool it names",
            ),
            (
                "rbd@v-vmsnap-r0000000d.json",
                json(&|v| {
                    v["imageSpec"] = "rbd/v-vmsnap-r0000000d".into();
                    v["access"]["monitors"] = serde_json::json!(["1.2.3.4 --keyring=/x:1"]);
                }),
                "monitor",
            ),
            (
                "rbd@u-vmsnap-r0000000e.json",
                json(&|v| {
                    v["imageSpec"] = "rbd/u-vmsnap-r0000000e".into();
                    v["vmUuid"] = "../../etc".into();
                }),
                "is not a UUID",
            ),
        ];
        for (name, bytes, _) in &bad {
            std::fs::write(folder.join(name), bytes).expect("write");
        }
        let (loaded, problems) = store.load_pending_checks();
        assert_eq!(loaded, std::slice::from_ref(&good));
        assert_eq!(problems.len(), bad.len(), "{problems:#?}");
        for (name, _, why) in &bad {
            assert!(
                problems.iter().any(|p| p.contains(name) && p.contains(why)),
                "{name}: {why}: {problems:#?}"
            );
        }
        // Settling answers the good one only and changes none of the others.
        let (answered, asked) = settle(&store, &[("a-vmsnap-r00000001", Ok(true))]);
        assert_eq!((answered, asked), (1, vec![good.image_spec.clone()]));
        for (name, bytes, _) in &bad {
            assert_eq!(
                &std::fs::read(folder.join(name)).expect("kept"),
                bytes,
                "{name}"
            );
        }
        assert!(store.load_pending_checks().0.is_empty());
    }

    #[test]
    fn a_restore_clones_under_a_name_of_its_own() {
        let mut restore: RestoreRecord = serde_json::from_value(serde_json::json!({
            "version": 2, "uuid": "fedcba98-0000-0000-0000-000000000000", "vmName": "a",
            "vmUuid": "u", "snapshotName": "s", "snapshotUuid": "x", "targetName": "clone",
            "targetUuid": "", "newVm": false, "stopTarget": false, "start": false,
            "takeSafetySnapshot": false, "phase": "InProgress", "complete": false,
            "creationTime": "", "restoreTime": "", "restores": [], "detached": [],
            "notRestored": [], "safetySnapshot": "", "error": "", "step": {"step": "planned"}
        }))
        .expect("a restore record");
        let in_place = RbdBackend.plan_restore(&restore, &volume()).expect("plans");
        // An earlier restore's suffix is replaced, not stacked.
        assert_eq!(in_place.to_image, "rbd:rbd/vm1-vmsnap-rfedcba98");
        restore.new_vm = true;
        let new_vm = RbdBackend.plan_restore(&restore, &volume()).expect("plans");
        assert_eq!(new_vm.to_image, "rbd:rbd/clone-vdb-vmsnap-rfedcba98");
        assert_eq!(
            RbdBackend.restored_source(true, &volume(), &new_vm),
            Some(("rbd/clone-vdb-vmsnap-rfedcba98".to_string(), "raw"))
        );
        restore.target_name = "x".repeat(130);
        assert!(RbdBackend.plan_restore(&restore, &volume()).is_err());
    }
}
