//! Snapshot records on disk: the content records and, while an operation runs, its journal.
//!
//! One JSON file per snapshot, `<state_dir>/snapshots/<vm-uuid>/<snapshot-uuid>.json`, mode 0600,
//! always replaced atomically (write a temporary file, fsync it, rename it over the old one, fsync
//! the directory). A record is written *before* each step that changes anything outside it, so a
//! restarted daemon can tell from it what was under way and finish or roll back.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmsnap_api::{ExcludedVolume, IncludedVolume, Indication, SnapshotPhase};

/// Format version of the record files. 2: each volume's backend part is its own (`backend`
/// tags it; an LVM volume's fields sit beside the common ones). 1: one shape for every volume
/// (`imageFormat` and `overlay` always, `lvm` nested for LVM); read and upgraded in memory, and
/// written as 2 at the record's next change.
pub const RECORD_VERSION: u32 = 2;

/// A snapshot and its content: KubeVirt's VirtualMachineSnapshot status and
/// VirtualMachineSnapshotContent, bound 1:1 in one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    pub version: u32,
    pub uuid: String,
    pub name: String,
    /// This and the other fields most records leave empty (`error`, `error_name`, `excluded`,
    /// `extra_state`) are boxed, with no spare room: 16 bytes each rather than 24 (issue 13).
    pub description: Box<str>,
    /// Shared by the records of one VM ([`shared_str`]); a string in the file.
    #[serde(with = "shared")]
    pub vm_name: Arc<str>,
    /// As `vm_name`.
    #[serde(with = "shared")]
    pub vm_uuid: Arc<str>,
    pub phase: SnapshotPhase,
    pub ready_to_use: bool,
    /// RFC 3339, UTC.
    pub creation_time: String,
    pub indications: Vec<Indication>,
    pub error: Box<str>,
    pub freeze_duration_ms: u64,
    pub frozen_filesystems: u32,
    /// Where an unfinished operation stands; `Done` once settled.
    pub step: Step,
    /// The VM's inactive domain XML as it was when the snapshot was taken; in memory only
    /// while an operation works with it (see [`DomainXml`]).
    pub domain_xml: DomainXml,
    pub volumes: Vec<VolumeRecord>,
    pub excluded: Box<[ExcludedVolume]>,
    /// Copies of the UEFI variables file and the emulated TPM's state.
    pub extra_state: Box<[StateCopy]>,
    /// The fullest copy-on-write space of the snapshot's thick LVM volumes, in percent (0 when
    /// it has none). Kept current by the fill monitor.
    #[serde(default)]
    pub cow_fill_percent: f64,
    /// Each indication with its message (KubeVirt's sourceIndications).
    #[serde(default)]
    pub source_indications: Vec<vmsnap_api::SourceIndication>,
    /// The D-Bus error name of `error` (`org.vmsnap.VmSnap1.Error.StorageFailed`, ...), so
    /// clients tell failures apart without reading the message; empty without an error.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub error_name: Box<str>,
}

/// The one `Arc<str>` holding `text`, shared by every record that holds the same text (a VM's
/// name and UUID, the same in each of its records: issue 13, two blocks and about 80 bytes a
/// record). Records take theirs from here as they are read and created. A text no record holds
/// any more is dropped from the set as it grows.
pub fn shared_str(text: &str) -> Arc<str> {
    /// The texts handed out, and the size at which those no longer held are dropped.
    struct Interned {
        texts: std::collections::BTreeSet<Arc<str>>,
        prune_at: usize,
    }
    static INTERNED: std::sync::Mutex<Interned> = std::sync::Mutex::new(Interned {
        texts: std::collections::BTreeSet::new(),
        prune_at: 64,
    });
    let mut interned = INTERNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(shared) = interned.texts.get(text) {
        return Arc::clone(shared);
    }
    if interned.texts.len() >= interned.prune_at {
        interned.texts.retain(|t| Arc::strong_count(t) > 1);
        interned.prune_at = (interned.texts.len() * 2).max(64);
    }
    let shared: Arc<str> = Arc::from(text);
    interned.texts.insert(Arc::clone(&shared));
    shared
}

/// Serde for an `Arc<str>` field: a string in the file, read into [`shared_str`]'s copy (the
/// file format is a plain string either way).
mod shared {
    use std::sync::Arc;

    pub fn serialize<S: serde::Serializer>(
        text: &Arc<str>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(text)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Arc<str>, D::Error> {
        struct Shared;
        impl serde::de::Visitor<'_> for Shared {
            type Value = Arc<str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            // Borrowed from the file's bytes where it can be: no string made only to be
            // dropped for the shared one.
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Arc<str>, E> {
                Ok(super::shared_str(text))
            }
        }
        deserializer.deserialize_str(Shared)
    }
}

/// A record's definition, some KiB per snapshot: held by the operation that records or uses
/// it, and otherwise left in the record file, so that the engine's and the bus's copies of
/// thousands of records stay small (issue 13). The file always has it: a record is first
/// written with it held, and a record saved without it keeps the file's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainXml {
    Held(String),
    /// In the record file only: [`Store::domain_xml`] reads it.
    OnDisk,
}

impl Serialize for DomainXml {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DomainXml::Held(xml) => serializer.serialize_str(xml),
            // Store::save fills it in first; writing a record without it would lose it.
            DomainXml::OnDisk => Err(serde::ser::Error::custom(
                "the domain XML was left in the record file",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for DomainXml {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(DomainXml::Held)
    }
}

/// One included disk: where the snapshot's data is, and what its backend made to hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    pub target: String,
    /// Where this snapshot's data is: a qcow2 backend's image file (the disk's top image when
    /// the snapshot was taken), an LVM backend's snapshot LV. Never written while the snapshot
    /// exists.
    pub image: String,
    pub virtual_size: u64,
    /// The backend's own part, tagged `backend` in the file.
    #[serde(flatten)]
    pub artifact: Artifact,
}

/// What each storage backend records for a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum Artifact {
    /// A qcow2 (or raw) file disk, captured by an external qcow2 overlay.
    #[serde(rename_all = "camelCase")]
    Qcow2 {
        /// The format of `image`: `qcow2` or `raw`.
        image_format: String,
        /// The overlay created by this snapshot: the disk's new top image, on which later
        /// writes (and later snapshots) build.
        overlay: String,
    },
    /// A disk on an LVM logical volume, captured by a snapshot LV.
    Lvm(LvmVolume),
    /// A disk on a Ceph RBD image, captured by an RBD snapshot.
    Rbd(RbdVolume),
    /// The simulated backend of the unit tests.
    #[cfg(test)]
    Sim(crate::backends::sim::SimVolume),
}

impl VolumeRecord {
    /// The backend's name, as clients see it (`IncludedVolume.backend`).
    pub fn backend_name(&self) -> &'static str {
        match self.artifact {
            Artifact::Qcow2 { .. } => vmsnap_api::DiskBackend::Qcow2.as_str(),
            Artifact::Lvm(_) => vmsnap_api::DiskBackend::Lvm.as_str(),
            Artifact::Rbd(_) => vmsnap_api::DiskBackend::Rbd.as_str(),
            #[cfg(test)]
            Artifact::Sim(_) => "sim",
        }
    }

    /// The LVM part of a volume on LVM.
    pub fn lvm(&self) -> Option<&LvmVolume> {
        match &self.artifact {
            Artifact::Lvm(l) => Some(l),
            _ => None,
        }
    }

    /// The RBD part of a volume on RBD.
    pub fn rbd(&self) -> Option<&RbdVolume> {
        match &self.artifact {
            Artifact::Rbd(r) => Some(r),
            _ => None,
        }
    }
}

/// An RBD volume of a snapshot: the snapshot `snap` of image `pool/[namespace/]image`, and how
/// the disk reached its cluster (the monitors, the Ceph user and the libvirt secret holding the
/// user's key, as the VM definition named them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RbdVolume {
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The image's name in its pool (`imageName`: the volume's own `image` is the snapshot).
    pub image_name: String,
    pub snap: String,
    /// `host:port` of each monitor the disk names; empty: the Ceph configuration's.
    #[serde(default)]
    pub monitors: Vec<String>,
    /// The Ceph user (without `client.`); empty: the Ceph configuration's default.
    #[serde(default)]
    pub user: String,
    /// The UUID of the libvirt secret with the user's key; empty: the keyrings.
    #[serde(default)]
    pub secret: String,
}

impl RbdVolume {
    /// `pool/[namespace/]image`.
    pub fn image_spec(&self) -> String {
        self.spec_of(&self.image_name)
    }

    /// `pool/[namespace/]name`: another image in the same pool and namespace.
    pub fn spec_of(&self, name: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{name}", self.pool),
            None => format!("{}/{name}", self.pool),
        }
    }

    /// `pool/[namespace/]image@snap`.
    pub fn snap_spec(&self) -> String {
        format!("{}@{}", self.image_spec(), self.snap)
    }
}

/// An LVM volume of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LvmVolume {
    pub vg: String,
    /// The disk's LV.
    pub origin: String,
    /// The snapshot LV, `<origin>.vmsnap-<first 8 of the snapshot UUID>`.
    pub snapshot: String,
    pub thin: bool,
    /// Copy-on-write bytes asked for a thick snapshot; 0 for thin.
    pub cow_size: u64,
    /// `vmsnap`, `vmsnap-vm-<VM UUID>`, `vmsnap-snap-<snapshot UUID>`.
    pub tags: Vec<String>,
}

/// A small piece of VM state copied with the snapshot (NVRAM file, TPM state directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateCopy {
    /// `nvram` or `tpm`.
    pub kind: String,
    /// Where the VM keeps it.
    pub source: String,
    /// The copy under the state directory.
    pub copy: String,
}

/// Journal steps. Each is written before the action it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "step")]
pub enum Step {
    /// Overlays planned; nothing changed yet.
    Planned,
    /// About to freeze (or frozen): recovery must thaw.
    Freezing,
    /// About to snapshot the disks (guest not frozen).
    Snapshotting,
    /// Settled.
    Done,
    /// Deleting: a merge under way. Boxed: the step of a settled record (almost all of them)
    /// takes 16 bytes, not the 72 of three strings inline (issue 13). The file's fields are
    /// the same (`step`, then the merge's).
    Merging(Box<Merge>),
}

/// A merge of a delete: `top` into `base` for disk `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Merge {
    pub target: String,
    pub base: String,
    pub top: String,
}

/// What is kept in a set ordered by its snapshot's UUID, rather than in a map keyed by a copy
/// of it (issue 13: a 36-byte string and a node's room per snapshot).
pub trait KeyedByUuid {
    fn uuid(&self) -> &str;
}

impl KeyedByUuid for std::sync::Arc<SnapshotRecord> {
    fn uuid(&self) -> &str {
        &self.uuid
    }
}

/// `T` ordered, compared and looked up (as `&str`) by its UUID only.
pub struct ByUuid<T>(pub T);

impl<T: KeyedByUuid> PartialEq for ByUuid<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.uuid() == other.0.uuid()
    }
}

impl<T: KeyedByUuid> Eq for ByUuid<T> {}

impl<T: KeyedByUuid> PartialOrd for ByUuid<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: KeyedByUuid> Ord for ByUuid<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.uuid().cmp(other.0.uuid())
    }
}

// `str`'s order is `String`'s, so a lookup by `&str` finds what `Ord` placed.
impl<T: KeyedByUuid> std::borrow::Borrow<str> for ByUuid<T> {
    fn borrow(&self) -> &str {
        self.0.uuid()
    }
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

impl SnapshotRecord {
    /// A new snapshot as it is asked for: InProgress, journal step Planned, nothing captured
    /// yet; the operation fills in the rest.
    pub fn request(
        name: String,
        description: String,
        vm_name: &str,
        vm_uuid: &str,
        excluded: Vec<ExcludedVolume>,
    ) -> SnapshotRecord {
        SnapshotRecord {
            version: RECORD_VERSION,
            uuid: uuid::Uuid::new_v4().to_string(),
            name,
            description: description.into(),
            vm_name: shared_str(vm_name),
            vm_uuid: shared_str(vm_uuid),
            phase: SnapshotPhase::InProgress,
            ready_to_use: false,
            creation_time: crate::ops::now_rfc3339(),
            indications: Vec::new(),
            error: Box::default(),
            freeze_duration_ms: 0,
            frozen_filesystems: 0,
            step: Step::Planned,
            // Held (empty): the first write has no file to take it from.
            domain_xml: DomainXml::Held(String::new()),
            volumes: Vec::new(),
            excluded: excluded.into(),
            extra_state: Box::default(),
            cow_fill_percent: 0.0,
            source_indications: Vec::new(),
            error_name: Box::default(),
        }
    }

    /// The record as the engine keeps it: without its definition, which stays in the file,
    /// and without spare room in its lists (a list read from JSON grows to 4 entries' room for
    /// 1 or 2: about 100 bytes a record, 1 MB of 10,000 records held for the daemon's life).
    /// Nor are its indications' messages kept when they are the ones that say what each
    /// indication means (as [`source_indications`] gives them, served for a record without
    /// any): the file keeps them, and the bus serves the same list (about 130 bytes a record).
    pub fn leave_xml_on_disk(&mut self) {
        self.domain_xml = DomainXml::OnDisk;
        if !self.source_indications.is_empty()
            && self.source_indications == source_indications(self, &[])
        {
            self.source_indications = Vec::new();
        }
        exact_size(&mut self.indications);
        exact_size(&mut self.source_indications);
        exact_size(&mut self.volumes);
    }

    pub fn included_volumes(&self) -> Vec<IncludedVolume> {
        self.volumes
            .iter()
            .map(|v| IncludedVolume {
                target: v.target.clone(),
                backend: v.backend_name().to_string(),
                image: v.image.clone(),
                virtual_size: v.virtual_size,
            })
            .collect()
    }
}

/// The record files under one state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The exclusive hold of one vmsnapd on a state folder, for as long as it lives: a second daemon
/// on the same folder would settle the first one's running operations as if they were
/// interrupted.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock (`<state_dir>/lock`, `flock`), or says which process holds it. The file
    /// holds the holder's pid, for that message only: the lock itself is the kernel's, released
    /// when the process ends however it ends.
    pub fn take(state_dir: &Path) -> Result<StateLock, String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| {
                format!(
                    "cannot create the state folder {}: {e}",
                    state_dir.display()
                )
            })?;
        let path = state_dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            return Err(format!(
                "another vmsnapd (pid {}) uses the state folder {}; one daemon per state folder",
                holder
                    .trim()
                    .parse::<u32>()
                    .map_or("unknown".to_string(), |p| p.to_string()),
                state_dir.display()
            ));
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(StateLock { _file: file })
    }
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store {
            root: state_dir.join("snapshots"),
        }
    }

    /// Directory for a snapshot's extra state copies (NVRAM, TPM).
    pub fn state_copy_dir(&self, vm_uuid: &str, snapshot_uuid: &str) -> PathBuf {
        self.root.join(vm_uuid).join(snapshot_uuid)
    }

    fn path(&self, vm_uuid: &str, snapshot_uuid: &str) -> PathBuf {
        self.root
            .join(vm_uuid)
            .join(format!("{snapshot_uuid}.json"))
    }

    /// Reads one snapshot record from disk (in any format this vmsnapd reads), with its
    /// definition.
    pub fn read(&self, vm_uuid: &str, snapshot_uuid: &str) -> Result<SnapshotRecord, String> {
        let path = self.path(vm_uuid, snapshot_uuid);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        parse_snapshot_record(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes a record atomically. A record without its definition keeps the one in its file
    /// (read first; a record whose file is gone is not written again).
    pub fn save(&self, record: &SnapshotRecord) -> std::io::Result<()> {
        let path = self.path(&record.vm_uuid, &record.uuid);
        let dir = path
            .parent()
            .ok_or_else(|| std::io::Error::other("record path has no directory"))?;
        let text = match &record.domain_xml {
            DomainXml::Held(_) => serde_json::to_vec_pretty(record),
            DomainXml::OnDisk => {
                let mut full = record.clone();
                full.domain_xml = DomainXml::Held(self.read_domain_xml(record)?);
                serde_json::to_vec_pretty(&full)
            }
        }
        .map_err(std::io::Error::other)?;
        write_atomically(dir, &format!("{}.json", record.uuid), &text)
    }

    /// A snapshot's definition: the one it holds, or else the one in its record file.
    pub fn domain_xml(&self, record: &SnapshotRecord) -> std::io::Result<String> {
        match &record.domain_xml {
            DomainXml::Held(xml) => Ok(xml.clone()),
            DomainXml::OnDisk => self.read_domain_xml(record),
        }
    }

    /// The `domainXml` of a record's file, the rest skipped (every format has it, as it is).
    fn read_domain_xml(&self, record: &SnapshotRecord) -> std::io::Result<String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Definition {
            domain_xml: String,
        }
        let path = self.path(&record.vm_uuid, &record.uuid);
        let bytes = fs::read(&path)?;
        serde_json::from_slice::<Definition>(&bytes)
            .map(|d| d.domain_xml)
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })
    }

    /// Removes a record and its state copies.
    pub fn remove(&self, record: &SnapshotRecord) -> std::io::Result<()> {
        let copies = self.state_copy_dir(&record.vm_uuid, &record.uuid);
        if copies.exists() {
            fs::remove_dir_all(&copies)?;
        }
        let path = self.path(&record.vm_uuid, &record.uuid);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Every record, oldest first, each without its definition (left in its file: thousands of
    /// them are loaded at start). Unreadable files are reported, not fatal: one damaged record
    /// must not hide the others.
    pub fn load_all(&self) -> (Vec<SnapshotRecord>, Vec<String>) {
        let mut records = Vec::new();
        let mut problems = Vec::new();
        let Ok(vms) = fs::read_dir(&self.root) else {
            return (records, problems);
        };
        let mut paths = Vec::new();
        for vm_dir in vms.flatten() {
            let Ok(files) = fs::read_dir(vm_dir.path()) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                let is_record = path.extension().is_some_and(|e| e == "json")
                    && !file.file_name().to_string_lossy().starts_with('.');
                if is_record {
                    paths.push(path);
                }
            }
        }
        // Read and parsed on a few threads: thousands of records at start (issue 13).
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .clamp(1, LOAD_THREADS);
        let chunk = paths.len().div_ceil(threads).max(1);
        let loaded: Vec<Vec<Result<SnapshotRecord, String>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = paths
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(|p| load_one(p)).collect()))
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| vec![Err("a record reader panicked".to_string())])
                })
                .collect()
        });
        for result in loaded.into_iter().flatten() {
            match result {
                Ok(record) => records.push(record),
                Err(e) => problems.push(e),
            }
        }
        records.sort_by(|a, b| {
            (a.creation_time.as_str(), a.name.as_str())
                .cmp(&(b.creation_time.as_str(), b.name.as_str()))
        });
        (records, problems)
    }
}

/// Moves a list with spare room into one of its exact size. A copy rather than
/// `shrink_to_fit`: shrinking in place leaves the spare part as a small hole between records
/// that nothing later fills, while the whole old block, freed, is taken again by the next
/// record's list as it is read.
fn exact_size<T>(list: &mut Vec<T>) {
    if list.capacity() > list.len() {
        let mut exact = Vec::with_capacity(list.len());
        exact.append(list);
        *list = exact;
    }
}

/// At most this many threads read the records at start.
const LOAD_THREADS: usize = 4;

/// One record file, read and parsed, its definition left on disk; an error names the file.
fn load_one(path: &Path) -> Result<SnapshotRecord, String> {
    fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| parse_snapshot_record(&bytes))
        .map(|mut record| {
            record.leave_xml_on_disk();
            record
        })
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    pub fn record(name: &str) -> SnapshotRecord {
        SnapshotRecord {
            version: RECORD_VERSION,
            uuid: format!("uuid-{name}"),
            name: name.to_string(),
            description: Box::default(),
            vm_name: "web".into(),
            vm_uuid: "vm-1".into(),
            phase: SnapshotPhase::Succeeded,
            ready_to_use: true,
            creation_time: format!("2026-11-26T14:00:0{}Z", name.len()),
            indications: vec![Indication::Online, Indication::GuestAgent],
            error: Box::default(),
            freeze_duration_ms: 60,
            frozen_filesystems: 1,
            step: Step::Done,
            domain_xml: DomainXml::Held("<domain/>".into()),
            volumes: vec![VolumeRecord {
                target: "vda".into(),
                image: "/i/a.qcow2".into(),
                virtual_size: 1 << 30,
                artifact: Artifact::Qcow2 {
                    image_format: "qcow2".into(),
                    overlay: "/i/b.qcow2".into(),
                },
            }],
            excluded: Box::default(),
            extra_state: Box::default(),
            cow_fill_percent: 0.0,
            source_indications: Vec::new(),
            error_name: Box::default(),
        }
    }

    /// Messages that only say what each indication means are left in the file (the bus serves
    /// the same ones for a record without any); a message noted when the snapshot was taken
    /// (the guest agent's own words) stays in memory.
    #[test]
    fn messages_that_say_what_each_indication_means_stay_in_the_file() {
        let mut plain = record("a");
        plain.source_indications = source_indications(&plain, &[]);
        let served = plain.source_indications.clone();
        assert!(!served.is_empty());
        plain.leave_xml_on_disk();
        assert!(plain.source_indications.is_empty());
        assert_eq!(source_indications(&plain, &[]), served);

        let mut noted = record("b");
        let note = (
            Indication::GuestAgent,
            "the agent froze / and /data".to_string(),
        );
        noted.source_indications = source_indications(&noted, &[note]);
        let kept = noted.source_indications.clone();
        noted.leave_xml_on_disk();
        assert_eq!(noted.source_indications, kept);
    }

    #[test]
    fn save_load_remove_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        let a = record("a");
        let mut bb = record("bb");
        bb.volumes.push(VolumeRecord {
            target: "vdb".into(),
            image: "/dev/vg/data.vmsnap-uuid-bb".into(),
            virtual_size: 1 << 30,
            artifact: Artifact::Lvm(LvmVolume {
                vg: "vg".into(),
                origin: "data".into(),
                snapshot: "data.vmsnap-uuid-bb".into(),
                thin: false,
                cow_size: 256 << 20,
                tags: vec!["vmsnap".into()],
            }),
        });
        // Every backend's fields come back, none shadowed by the volume's own (`image`).
        bb.volumes.push(VolumeRecord {
            target: "vdc".into(),
            image: "rbd:pool/ns/disk@vmsnap-uuid-bb".into(),
            virtual_size: 1 << 34,
            artifact: Artifact::Rbd(RbdVolume {
                pool: "pool".into(),
                namespace: Some("ns".into()),
                image_name: "disk".into(),
                snap: "vmsnap-uuid-bb".into(),
                monitors: vec!["10.0.0.1:6789".into()],
                user: "libvirt".into(),
                secret: "0a5f9e61-4c8f-4a7e-9d0e-3c2b1a000001".into(),
            }),
        });
        bb.cow_fill_percent = 12.5;
        bb.step = Step::Merging(Box::new(Merge {
            target: "vda".into(),
            base: "/i/a.qcow2".into(),
            top: "/i/b.qcow2".into(),
        }));
        store.save(&bb).expect("save");
        store.save(&a).expect("save");
        let (loaded, problems) = store.load_all();
        assert!(problems.is_empty(), "{problems:?}");
        // Loaded without the definition, which the file keeps.
        let on_disk = |r: &SnapshotRecord| {
            let mut r = r.clone();
            r.leave_xml_on_disk();
            r
        };
        assert_eq!(loaded, vec![on_disk(&a), on_disk(&bb)]);
        assert_eq!(store.domain_xml(&loaded[0]).expect("reads"), "<domain/>");

        let file = dir.path().join("snapshots/vm-1/uuid-a.json");
        let mode = fs::metadata(&file).expect("exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        store.remove(&a).expect("remove");
        assert_eq!(store.load_all().0, vec![on_disk(&bb)]);
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("snapshots/vm-1"))
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
    }

    /// A record saved without its definition keeps the file's; one whose file is gone, or
    /// whose file has none, is an error, not a record written without it.
    #[test]
    fn a_record_saved_without_its_definition_keeps_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        let mut a = record("a");
        a.domain_xml = DomainXml::Held("<domain><name>web</name></domain>".into());
        store.save(&a).expect("save");
        let mut changed = store.load_all().0.remove(0);
        assert_eq!(changed.domain_xml, DomainXml::OnDisk);
        changed.phase = SnapshotPhase::Deleting;
        store.save(&changed).expect("save");
        let file = dir.path().join("snapshots/vm-1/uuid-a.json");
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(&file).expect("read")).expect("json");
        assert_eq!(json["domainXml"], "<domain><name>web</name></domain>");
        assert_eq!(json["phase"], "Deleting");
        assert_eq!(json["version"], RECORD_VERSION);
        assert!(
            serde_json::to_vec(&changed).is_err(),
            "never written without it"
        );

        fs::write(&file, br#"{"version": 2}"#).expect("write");
        let broken = store.save(&changed).expect_err("no definition in the file");
        assert!(broken.to_string().contains("domainXml"), "{broken}");
        store.remove(&changed).expect("remove");
        let gone = store.save(&changed).expect_err("no file");
        assert_eq!(gone.kind(), std::io::ErrorKind::NotFound);
        assert!(!file.exists(), "a removed record is not written again");
        assert_eq!(
            store.domain_xml(&changed).expect_err("gone").kind(),
            std::io::ErrorKind::NotFound
        );
    }

    #[test]
    fn loaded_records_keep_no_spare_room_in_their_lists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        let mut a = record("a");
        a.source_indications = vec![
            vmsnap_api::SourceIndication {
                indication: "Online".into(),
                message: "the VM was running".into(),
            },
            vmsnap_api::SourceIndication {
                indication: "GuestAgent".into(),
                message: "frozen".into(),
            },
        ];
        store.save(&a).expect("save");
        let (loaded, problems) = store.load_all();
        assert!(problems.is_empty(), "{problems:?}");
        let [r] = loaded.as_slice() else {
            panic!("one record: {loaded:?}")
        };
        assert_eq!(r.source_indications, a.source_indications);
        assert_eq!(r.source_indications.capacity(), 2);
        assert_eq!(r.indications.capacity(), r.indications.len());
        assert_eq!(r.volumes.capacity(), r.volumes.len());
    }

    /// A record file as vmsnapd wrote it before a VM's name and UUID were shared between its
    /// records (main at 9e25c96, `Store::save`): the same bytes either way.
    const RECORD_FILE: &str = r#"{
  "version": 2,
  "uuid": "5ca1e000-0000-4000-8000-000000000001",
  "name": "before-upgrade",
  "description": "a \"quoted\" description",
  "vmName": "web-1",
  "vmUuid": "0a5f9e61-4c8f-4a7e-9d0e-3c2b1a000002",
  "phase": "Deleting",
  "readyToUse": false,
  "creationTime": "2026-11-26T14:00:00Z",
  "indications": [
    "Online",
    "GuestAgent"
  ],
  "error": "",
  "freezeDurationMs": 60,
  "frozenFilesystems": 2,
  "step": {
    "step": "merging",
    "target": "vda",
    "base": "/i/a.qcow2",
    "top": "/i/b.qcow2"
  },
  "domainXml": "<domain><name>web-1</name></domain>",
  "volumes": [
    {
      "target": "vda",
      "image": "/i/a.qcow2",
      "virtualSize": 1073741824,
      "backend": "qcow2",
      "imageFormat": "qcow2",
      "overlay": "/i/b.qcow2"
    }
  ],
  "excluded": [
    {
      "target": "vdb",
      "reason": "a shared disk"
    }
  ],
  "extraState": [],
  "cowFillPercent": 12.5,
  "sourceIndications": [
    {
      "indication": "GuestAgent",
      "message": "the agent froze / and /data"
    }
  ],
  "errorName": "org.vmsnap.VmSnap1.Error.StorageFailed"
}"#;

    /// Files written before load into the record with its shared strings, and are written
    /// back byte for byte: held definition or left on disk.
    #[test]
    fn a_record_file_written_before_loads_and_is_written_back_the_same() {
        let (vm, uuid) = (
            "0a5f9e61-4c8f-4a7e-9d0e-3c2b1a000002",
            "5ca1e000-0000-4000-8000-000000000001",
        );
        // With an error name, and without one (no `errorName` field at all then).
        let without_error_name = RECORD_FILE.replace(
            ",\n  \"errorName\": \"org.vmsnap.VmSnap1.Error.StorageFailed\"",
            "",
        );
        assert_ne!(without_error_name, RECORD_FILE);
        for text in [RECORD_FILE, &without_error_name] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::new(dir.path());
            let file = dir.path().join(format!("snapshots/{vm}/{uuid}.json"));
            fs::create_dir_all(file.parent().expect("folder")).expect("mkdir");
            fs::write(&file, text).expect("write");

            let read = store.read(vm, uuid).expect("loads");
            assert_eq!((&*read.vm_name, &*read.vm_uuid), ("web-1", vm));
            assert_eq!(&*read.description, "a \"quoted\" description");
            assert!(matches!(read.step, Step::Merging(ref m) if m.top == "/i/b.qcow2"));
            store.save(&read).expect("save");
            assert_eq!(fs::read_to_string(&file).expect("read"), text);

            let (loaded, problems) = store.load_all();
            assert!(problems.is_empty(), "{problems:?}");
            let [on_disk] = loaded.as_slice() else {
                panic!("one record: {loaded:?}")
            };
            assert_eq!(on_disk.domain_xml, DomainXml::OnDisk);
            store.save(on_disk).expect("save");
            assert_eq!(fs::read_to_string(&file).expect("read"), text);
        }
    }

    /// The records of one VM hold one copy of its name and UUID, loaded or created; another
    /// VM's are its own.
    #[test]
    fn the_records_of_one_vm_share_its_name_and_uuid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        let mut other = record("c");
        other.vm_uuid = "vm-shared-2".into();
        other.vm_name = "shared-2".into();
        for mut r in [record("a"), record("bb"), other] {
            if &*r.vm_uuid == "vm-1" {
                r.vm_uuid = "vm-shared-1".into();
                r.vm_name = "shared-1".into();
            }
            store.save(&r).expect("save");
        }
        let (loaded, problems) = store.load_all();
        assert!(problems.is_empty(), "{problems:?}");
        let named = |name: &str| {
            loaded
                .iter()
                .find(|r| r.name == name)
                .unwrap_or_else(|| panic!("{name} in {loaded:?}"))
        };
        let (a, bb, c) = (named("a"), named("bb"), named("c"));
        assert_eq!((&*a.vm_uuid, &*c.vm_uuid), ("vm-shared-1", "vm-shared-2"));
        assert!(Arc::ptr_eq(&a.vm_uuid, &bb.vm_uuid));
        assert!(Arc::ptr_eq(&a.vm_name, &bb.vm_name));
        assert!(!Arc::ptr_eq(&a.vm_uuid, &c.vm_uuid));
        let created =
            SnapshotRecord::request("d".into(), String::new(), "shared-1", "vm-shared-1", vec![]);
        assert!(Arc::ptr_eq(&created.vm_uuid, &a.vm_uuid));
        assert!(Arc::ptr_eq(&created.vm_name, &a.vm_name));
        // Read again, one record alone takes the same copy.
        let again = store.read("vm-shared-2", &c.uuid).expect("reads");
        assert!(Arc::ptr_eq(&again.vm_uuid, &c.vm_uuid));
    }

    /// A text no record holds any more is dropped as the set grows; one still held is kept.
    #[test]
    fn shared_texts_no_longer_held_are_dropped() {
        let kept = shared_str("shared-text-kept");
        let weak = Arc::downgrade(&shared_str("shared-text-dropped"));
        // Other tests hold texts of their own meanwhile, which moves the size the set is pruned
        // at: texts are added until it is (a bound, not a count to reach).
        for i in 0..100_000 {
            if weak.upgrade().is_none() {
                break;
            }
            drop(shared_str(&format!("shared-text-{i}")));
        }
        assert!(weak.upgrade().is_none(), "dropped from the set");
        assert!(Arc::ptr_eq(&kept, &shared_str("shared-text-kept")));
    }

    #[test]
    fn records_without_lvm_fields_still_load() {
        let mut json = serde_json::to_value(record("a")).expect("json");
        let object = json.as_object_mut().expect("object");
        object.remove("cowFillPercent");
        let parsed: SnapshotRecord = serde_json::from_value(json).expect("old record loads");
        assert_eq!(parsed, record("a"));
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/records-v1")
            .join(name);
        fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Records written by the release before format 2 (its own serializer wrote these files).
    #[test]
    fn format_1_records_load_with_every_field() {
        let mixed = parse_snapshot_record(&fixture("snapshot-mixed.json")).expect("loads");
        assert_eq!(mixed.version, RECORD_VERSION);
        assert_eq!(mixed.volumes.len(), 3);
        assert_eq!(
            mixed.volumes[0].artifact,
            Artifact::Qcow2 {
                image_format: "qcow2".into(),
                overlay: "/var/lib/libvirt/images/vmsnap-lab-mixed-vda-5b0c2a52.qcow2".into()
            }
        );
        assert_eq!(
            mixed.volumes[0].image,
            "/var/lib/libvirt/images/mixed.qcow2"
        );
        assert_eq!(mixed.volumes[0].virtual_size, 2147483648);
        let thin = mixed.volumes[1].lvm().expect("lvm");
        assert_eq!(mixed.volumes[1].image, "/dev/vmsnapvg/data.vmsnap-5b0c2a52");
        assert_eq!(
            (
                thin.vg.as_str(),
                thin.origin.as_str(),
                thin.snapshot.as_str()
            ),
            ("vmsnapvg", "data", "data.vmsnap-5b0c2a52")
        );
        assert!(thin.thin && thin.cow_size == 0 && thin.tags.len() == 3);
        let thick = mixed.volumes[2].lvm().expect("lvm");
        assert!(!thick.thin && thick.cow_size == 67108864);
        assert_eq!(mixed.volumes[2].backend_name(), "lvm");
        assert_eq!(mixed.excluded.len(), 1);
        assert_eq!(mixed.source_indications.len(), 1);

        let merging = parse_snapshot_record(&fixture("snapshot-merging.json")).expect("loads");
        assert_eq!(merging.phase, SnapshotPhase::Deleting);
        assert!(matches!(merging.step, Step::Merging(ref m) if m.target == "vda"));

        let restore =
            parse_restore_record(&fixture("restores/restore-committed.json")).expect("loads");
        match &restore.step {
            RestoreStep::Committed { volume_steps, .. } => {
                assert_eq!(volume_steps.get("vdb").map(String::as_str), Some("swap"))
            }
            other => panic!("step {other:?}"),
        }
        assert_eq!(restore.version, RECORD_VERSION);
    }

    /// Written again, an upgraded record is format 2 and reads back the same.
    #[test]
    fn an_upgraded_record_is_written_as_format_2() {
        let mixed = parse_snapshot_record(&fixture("snapshot-mixed.json")).expect("loads");
        let text = serde_json::to_vec(&mixed).expect("json");
        let json: serde_json::Value = serde_json::from_slice(&text).expect("json");
        assert_eq!(json["version"], 2);
        assert_eq!(json["volumes"][1]["backend"], "lvm");
        assert_eq!(json["volumes"][1]["vg"], "vmsnapvg");
        assert!(json["volumes"][1].get("overlay").is_none());
        assert!(json["volumes"][1].get("lvm").is_none());
        assert_eq!(parse_snapshot_record(&text).expect("loads"), mixed);
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let mut json = serde_json::to_value(record("a")).expect("json");
        json["version"] = 3.into();
        let text = serde_json::to_vec(&json).expect("json");
        let refused = parse_snapshot_record(&text).expect_err("newer");
        assert!(refused.contains("format version 3"), "{refused}");
    }

    #[test]
    fn damaged_record_is_reported_and_others_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        store.save(&record("a")).expect("save");
        fs::write(dir.path().join("snapshots/vm-1/broken.json"), b"{not json").expect("write");
        let (loaded, problems) = store.load_all();
        assert_eq!(loaded.len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("broken.json"));
    }
}

/// A restore: KubeVirt's VirtualMachineRestore status, and its journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRecord {
    pub version: u32,
    pub uuid: String,
    pub vm_name: String,
    pub vm_uuid: String,
    pub snapshot_name: String,
    pub snapshot_uuid: String,
    /// The VM restored: the same one in place, or the new one.
    pub target_name: String,
    /// Empty until a new VM is defined.
    pub target_uuid: String,
    pub new_vm: bool,
    pub stop_target: bool,
    pub start: bool,
    pub take_safety_snapshot: bool,
    pub phase: vmsnap_api::RestorePhase,
    pub complete: bool,
    pub creation_time: String,
    pub restore_time: String,
    pub restores: Vec<vmsnap_api::VolumeRestore>,
    pub detached: Vec<vmsnap_api::DetachedDisk>,
    pub not_restored: Vec<ExcludedVolume>,
    pub safety_snapshot: String,
    pub error: String,
    pub step: RestoreStep,
    /// The name the restore was asked under (a VirtualMachineRestore's metadata.name); empty
    /// for a restore that has none (it is then known by its UUID).
    #[serde(default)]
    pub name: String,
    /// KubeVirt's targetReadinessPolicy for an in-place restore of a VM that is not shut off:
    /// `StopTarget`, `FailImmediate`, `WaitGracePeriod` or `WaitEventually`; empty: as
    /// `stop_target` says (shut it down, or fail).
    #[serde(default)]
    pub readiness_policy: String,
    /// As [`SnapshotRecord::error_name`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_name: String,
}

/// Restore journal steps, each written before the action it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "step")]
pub enum RestoreStep {
    /// Nothing changed yet (a safety snapshot, if any, is a snapshot of its own).
    Planned,
    /// New overlays being created and the definition replaced; `previous_xml` is the VM's
    /// definition before (empty for a new VM), to put back if this does not finish.
    #[serde(rename_all = "camelCase")]
    Applying {
        previous_xml: String,
    },
    /// Volumes whose restore replaces data in place being restored, then the definition: from
    /// here the restore only goes forward (an LV's data, once replaced, cannot be put back).
    /// `volume_steps` holds, per disk target, the backend's step last begun, `done` once the
    /// disk is restored (`lvmSteps` in format 1).
    #[serde(rename_all = "camelCase")]
    Committed {
        previous_xml: String,
        #[serde(alias = "lvmSteps")]
        volume_steps: std::collections::BTreeMap<String, String>,
    },
    Done,
}

impl Store {
    fn restores_dir(&self) -> PathBuf {
        self.root
            .parent()
            .map(|p| p.join("restores"))
            .unwrap_or_else(|| self.root.join("../restores"))
    }

    pub fn save_restore(&self, record: &RestoreRecord) -> std::io::Result<()> {
        let dir = self.restores_dir();
        let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        write_atomically(&dir, &format!("{}.json", record.uuid), &text)
    }

    /// Removes a restore's record (deleting a finished restore).
    pub fn remove_restore(&self, uuid: &str) -> std::io::Result<()> {
        let dir = self.restores_dir();
        match fs::remove_file(dir.join(format!("{uuid}.json"))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        File::open(&dir)?.sync_all()
    }

    pub fn load_restores(&self) -> (Vec<RestoreRecord>, Vec<String>) {
        let mut records = Vec::new();
        let mut problems = Vec::new();
        let Ok(files) = fs::read_dir(self.restores_dir()) else {
            return (records, problems);
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_none_or(|e| e != "json")
                || file.file_name().to_string_lossy().starts_with('.')
            {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| parse_restore_record(&b))
            {
                Ok(r) => records.push(r),
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
        records.sort_by(|a, b| a.creation_time.cmp(&b.creation_time));
        (records, problems)
    }
}

/// A snapshot record as read from its file. Its UUIDs become path components (the state copies'
/// folder) and D-Bus object paths, so a record whose UUIDs hold anything but letters, digits and
/// `-` is refused, like one that is not JSON.
pub fn parse_snapshot_record(bytes: &[u8]) -> Result<SnapshotRecord, String> {
    // The current format straight into the record (no JSON tree: start-up reads thousands);
    // anything else (format 1 to upgrade, a newer format, a broken file) through the tree below,
    // which upgrades or names the problem.
    if let Ok(record) = serde_json::from_slice::<SnapshotRecord>(bytes) {
        if record.version == RECORD_VERSION {
            check_uuids(&[&record.uuid, &record.vm_uuid])?;
            return Ok(record);
        }
    }
    let mut json: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match json.get("version").and_then(serde_json::Value::as_u64) {
        Some(1) => upgrade_volumes_from_v1(&mut json)?,
        Some(v) if v == u64::from(RECORD_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "format version {v} is newer than this vmsnapd reads ({RECORD_VERSION}); it was written by a newer vmsnapd"
            ))
        }
        None => return Err("the record has no format version".to_string()),
    }
    let mut record: SnapshotRecord = serde_json::from_value(json).map_err(|e| e.to_string())?;
    record.version = RECORD_VERSION;
    check_uuids(&[&record.uuid, &record.vm_uuid])?;
    Ok(record)
}

/// Format 1 gave every volume `imageFormat` and `overlay` (empty for LVM) and nested an LVM
/// volume's fields under `lvm`; format 2 keeps only the backend's own fields, flat.
fn upgrade_volumes_from_v1(json: &mut serde_json::Value) -> Result<(), String> {
    let Some(volumes) = json.get_mut("volumes").and_then(|v| v.as_array_mut()) else {
        return Ok(());
    };
    for volume in volumes {
        let Some(fields) = volume.as_object_mut() else {
            return Err("a volume is not an object".to_string());
        };
        let lvm = fields.remove("lvm").filter(|l| !l.is_null());
        match (fields.get("backend").and_then(|b| b.as_str()), lvm) {
            (Some("lvm"), Some(serde_json::Value::Object(lvm))) => {
                fields.remove("imageFormat");
                fields.remove("overlay");
                fields.extend(lvm);
            }
            (Some("lvm"), _) => return Err("an LVM volume has no `lvm` part".to_string()),
            _ => {}
        }
    }
    Ok(())
}

/// A restore record as read from its file; see [`parse_snapshot_record`].
pub fn parse_restore_record(bytes: &[u8]) -> Result<RestoreRecord, String> {
    let mut record: RestoreRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if record.version > RECORD_VERSION {
        return Err(format!(
            "format version {} is newer than this vmsnapd reads ({RECORD_VERSION}); it was written by a newer vmsnapd",
            record.version
        ));
    }
    // Format 1 differs only in `lvmSteps`, read through its alias.
    record.version = RECORD_VERSION;
    check_uuids(&[&record.uuid, &record.vm_uuid, &record.snapshot_uuid])?;
    if !record.target_uuid.is_empty() {
        check_uuids(&[&record.target_uuid])?;
    }
    Ok(record)
}

fn check_uuids(uuids: &[&str]) -> Result<(), String> {
    let safe = |u: &&str| !u.is_empty() && u.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    match uuids.iter().find(|u| !safe(u)) {
        Some(bad) => Err(format!("\"{}\" is not a UUID", vmsnap_api::excerpt(bad))),
        None => Ok(()),
    }
}

/// Writes `name` in `dir` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    })();
    if let Err(e) = written {
        // A full disk or an I/O error: no half-written temporary file stays behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// Format version of a pending RBD orphan check's file.
pub const PENDING_CHECK_VERSION: u32 = 1;

/// An RBD image whose "is it still needed?" check (`backends::rbd::remove_if_orphaned`) is owed:
/// recorded before the step after which the check could be lost (a delete's RBD snapshot
/// removal, an in-place restore's release of the clone it replaced), dropped once a check gave
/// a definite answer. Only images this host's own operations recorded are ever looked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PendingOrphanCheck {
    pub version: u32,
    /// `pool/[namespace/]image`.
    pub image_spec: String,
    /// The VM whose disk the image was (its definitions are looked at).
    pub vm_uuid: String,
    /// How the cluster is reached: as this volume of a record reached it.
    pub access: RbdVolume,
}

impl PendingOrphanCheck {
    pub fn new(image_spec: String, vm_uuid: &str, access: &RbdVolume) -> PendingOrphanCheck {
        PendingOrphanCheck {
            version: PENDING_CHECK_VERSION,
            image_spec,
            vm_uuid: vm_uuid.to_string(),
            access: access.clone(),
        }
    }

    /// The entry's file name: the image spec with `/` as `@`, which no pool, namespace or
    /// image name holds, so each image has one file and the name never starts with a dot.
    fn file_name(image_spec: &str) -> String {
        format!("{}.json", image_spec.replace('/', "@"))
    }
}

impl Store {
    fn pending_checks_dir(&self) -> PathBuf {
        self.root
            .parent()
            .map(|p| p.join("rbd-orphan-checks"))
            .unwrap_or_else(|| self.root.join("../rbd-orphan-checks"))
    }

    /// Records a pending check (atomically; one for the same image is replaced).
    pub fn save_pending_check(&self, check: &PendingOrphanCheck) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(check).map_err(std::io::Error::other)?;
        write_atomically(
            &self.pending_checks_dir(),
            &PendingOrphanCheck::file_name(&check.image_spec),
            &text,
        )
    }

    /// Drops the pending check of image `image_spec`; one already gone is fine.
    pub fn remove_pending_check(&self, image_spec: &str) -> std::io::Result<()> {
        let dir = self.pending_checks_dir();
        match fs::remove_file(dir.join(PendingOrphanCheck::file_name(image_spec))) {
            Ok(()) => File::open(&dir)?.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every pending check, and a problem (naming its file) for each file that is not one:
    /// such a file is left as it is and nothing is done about the image it may name.
    pub fn load_pending_checks(&self) -> (Vec<PendingOrphanCheck>, Vec<String>) {
        let mut checks = Vec::new();
        let mut problems = Vec::new();
        let Ok(files) = fs::read_dir(self.pending_checks_dir()) else {
            return (checks, problems);
        };
        for file in files.flatten() {
            // Temporary files of a write a crash cut short.
            if file.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = file.path();
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| parse_pending_check(&b))
            {
                Ok(check)
                    if path.file_name().and_then(|n| n.to_str())
                        == Some(PendingOrphanCheck::file_name(&check.image_spec).as_str()) =>
                {
                    checks.push(check)
                }
                Ok(check) => problems.push(format!(
                    "{}: names the image {}, not the one its file name says",
                    path.display(),
                    vmsnap_api::excerpt(&check.image_spec)
                )),
                Err(e) => problems.push(format!(
                    "{}: not a pending RBD orphan check: {e}",
                    path.display()
                )),
            }
        }
        checks.sort_by(|a, b| a.image_spec.cmp(&b.image_spec));
        (checks, problems)
    }
}

/// A pending check as read from its file: its format, the image spec (an RBD image in the
/// access's pool) and the VM's UUID checked, as they go to `rbd` and to libvirt.
pub fn parse_pending_check(bytes: &[u8]) -> Result<PendingOrphanCheck, String> {
    let check: PendingOrphanCheck = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if check.version > PENDING_CHECK_VERSION {
        return Err(format!(
            "format version {} is newer than this vmsnapd reads ({PENDING_CHECK_VERSION}); it was written by a newer vmsnapd",
            check.version
        ));
    }
    match crate::disks::rbd_image(&format!("rbd:{}", check.image_spec)) {
        Some((pool, ns, _))
            if pool == check.access.pool && ns == check.access.namespace.as_deref() => {}
        _ => {
            return Err(format!(
                "\"{}\" is not an RBD image of the pool it names",
                vmsnap_api::excerpt(&check.image_spec)
            ))
        }
    }
    check_uuids(&[&check.vm_uuid])?;
    // Monitors, user and secret go on `rbd`'s command line: checked as a record's from
    // another host is.
    let access = &check.access;
    crate::backends::rbd::check_portable(
        "of the check",
        &format!("rbd:{}", access.snap_spec()),
        access,
    )?;
    Ok(check)
}
