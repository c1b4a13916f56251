//! The image forest: which image backs which, who uses each, across every VM on the host.
//!
//! After a restore the history of a disk branches: a snapshot's image can back the VM's new
//! overlay, an older branch (kept by a safety snapshot), and a new VM made from it. Deleting a
//! snapshot only releases its claim on its image; whether the image's space can be reclaimed,
//! and how, depends on what else still uses it, which this module works out from the real
//! backing chains (read from the qcow2 headers) and the domain definitions (libvirt).

use std::collections::BTreeSet;
use std::sync::Arc;

// Fx: the forest hashes every image path several times per scan; the paths come from this
// host's definitions and headers, not from a network peer.
use rustc_hash::{FxHashMap, FxHashSet};

use tracing::{debug, info};
use virt::connect::Connect;
use vmsnap_api::SnapshotPhase;

use super::chain;
use crate::disks::SysfsLvmProbe;
use crate::domain::{lower_case, parse_domain, VmInfo};
use crate::libvirt::InventoryView;
use crate::store::{Artifact, SnapshotRecord};

/// A disk of a domain and its top image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTop {
    pub domain_uuid: String,
    pub target: String,
    pub path: String,
    pub running: bool,
}

/// What the forest knows of one image.
#[derive(Debug, Default)]
struct Node {
    /// Its backing image.
    parent: Option<Arc<str>>,
    /// Its format, when read from a chain.
    format: Option<std::borrow::Cow<'static, str>>,
}

#[derive(Debug, Default)]
pub struct Forest {
    /// Every image seen -> its links. One map, its keys and links shared with the chain
    /// reader's memo: an image of a chain served again costs one insert, no allocation.
    nodes: FxHashMap<Arc<str>, Node>,
    pub tops: Vec<DiskTop>,
    /// Files found next to the images that build on one of them, named by no domain or record.
    unknown: FxHashSet<String>,
    /// The inventory the scan took the domains from.
    inventory: Option<crate::libvirt::Inventory>,
}

const VIR_DOMAIN_XML_INACTIVE: u32 = 2;

/// The most images a scan has held: a scan's map is made that large at once. At 513 domains
/// a scan's 1,018 images otherwise grew it through several reallocations, each hashing every
/// path again (issue 13).
static MOST_IMAGES_SCANNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Bound on that size: far beyond a host's images.
const MOST_IMAGES_KEPT_ROOM_FOR: usize = 1 << 20;

/// Where a scan learns which images the domains use.
pub struct HostView<'a> {
    pub conn: &'a Connect,
    /// Every domain as the libvirt thread last read it (it follows libvirt's events), asked
    /// at each scan; `None` when it has no current inventory, and then every domain is read
    /// over `conn`.
    pub inventory: Box<dyn Fn() -> Option<InventoryView> + 'a>,
    /// The VM of the operation (lower-case UUID): always read again, it is the one changing.
    pub own_vm: Option<String>,
}

impl<'a> HostView<'a> {
    /// A view that reads every domain itself.
    pub fn reading_all(conn: &'a Connect) -> HostView<'a> {
        HostView {
            conn,
            inventory: Box::new(|| None),
            own_vm: None,
        }
    }
}

/// One domain's disks as a scan uses them.
struct DomainTops {
    uuid: String,
    running: bool,
    /// (target, path) of each disk on a file.
    disks: Vec<(String, String)>,
}

/// The disks that count as using their images: every disk on a file, read-only and
/// shareable ones included (a VM reading an image needs it as much as one writing it).
fn file_disks(vm: &VmInfo) -> Vec<(String, String)> {
    vm.disks
        .iter()
        .filter(|d| d.backend == "qcow2" || (d.source.starts_with('/') && is_file(&d.source)))
        .map(|d| (d.target.clone(), d.source.clone()))
        .collect()
}

fn is_file(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

impl DomainTops {
    /// `tops` gathered per domain, keyed by what `key` makes of the domain's UUID.
    fn gather(
        tops: impl IntoIterator<Item = DiskTop>,
        key: impl Fn(&str) -> String,
    ) -> FxHashMap<String, DomainTops> {
        let mut gathered: FxHashMap<String, DomainTops> = FxHashMap::default();
        for top in tops {
            gathered
                .entry(key(&top.domain_uuid))
                .or_insert_with(|| DomainTops {
                    uuid: top.domain_uuid.clone(),
                    running: top.running,
                    disks: Vec::new(),
                })
                .disks
                .push((top.target, top.path));
        }
        gathered
    }

    /// A domain as the inventory last read it.
    fn from_inventory(vm: &VmInfo) -> DomainTops {
        DomainTops {
            uuid: vm.uuid.clone(),
            running: !matches!(
                vm.state,
                vmsnap_api::VmState::ShutOff | vmsnap_api::VmState::NoState
            ),
            disks: file_disks(vm),
        }
    }
}

/// Frees domain handles on a thread of their own, off the operation's path: libvirt formats a
/// domain's UUID twice for its debug log as it frees each handle, about 0.4 ms per scan at 500
/// domains, which the operation need not wait for. Freed at once when that thread cannot be had.
/// The thread runs only on a core nothing else wants (`SCHED_IDLE`): on a host with two cores it
/// otherwise took one from the operation and libvirtd right after each listing (issue 13).
fn free_later(handles: Vec<virt::domain::Domain>) {
    use std::sync::mpsc::Sender;
    use std::sync::{Mutex, OnceLock};
    static FREER: OnceLock<Option<Mutex<Sender<Vec<virt::domain::Domain>>>>> = OnceLock::new();
    let freer = FREER.get_or_init(|| {
        let (send, handles) = std::sync::mpsc::channel::<Vec<virt::domain::Domain>>();
        std::thread::Builder::new()
            .name("libvirt-free".into())
            .spawn(move || {
                yield_to_any_other_work();
                handles.into_iter().for_each(drop)
            })
            .ok()
            .map(|_| Mutex::new(send))
    });
    let Some(freer) = freer else {
        return;
    };
    // A send fails only if that thread is gone: the handles come back and are freed here.
    let _ = freer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(handles);
}

/// Puts the calling thread in the `SCHED_IDLE` class: it runs when a core would otherwise be
/// idle. Best effort: a thread left in its class only competes as before.
fn yield_to_any_other_work() {
    // SAFETY: a zeroed `sched_param` is valid (SCHED_IDLE takes priority 0); pid 0 is the
    // calling thread.
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the call reads `param` only.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

/// Reads one domain over the connection: `None` when it is gone or unreadable.
fn read_domain(dom: &virt::domain::Domain) -> Option<DomainTops> {
    let running = dom.is_active().ok()?;
    let flags = if running { 0 } else { VIR_DOMAIN_XML_INACTIVE };
    let xml = dom.xml_desc(flags).ok()?;
    let uuid = dom.uuid_string().ok()?;
    let vm = parse_domain(&xml, vmsnap_api::VmState::Unknown, &SysfsLvmProbe).ok()?;
    Some(DomainTops {
        uuid,
        running,
        disks: file_disks(&vm),
    })
}

impl Forest {
    /// The forest around `focus`, the images an operation is about to release, merge or
    /// remove: the chains of every domain's disks and of the images `records` name, the
    /// `focus` images' own chains (one being released may no longer be named by anything),
    /// and the files next to the images connected to `focus` that build on them.
    ///
    /// With an inventory (`view.inventory`), one call lists the domains and each is taken from
    /// the inventory, except those it may be behind for, which are read again now: the
    /// operation's own VM, one vmsnapd changed since the inventory read it, one the inventory
    /// lacks, one whose disks use an image connected to `focus` (a disk-only snapshot changes
    /// a running domain's disks with no event) or an image that is gone. Without one, every
    /// domain is read. Every header is read through the chain reader's cache: nothing per
    /// unchanged image the change feed watches, a `stat` per other one.
    pub fn scan(
        view: &HostView,
        records: &[Arc<SnapshotRecord>],
        focus: &[&str],
    ) -> Result<Forest, String> {
        let started = std::time::Instant::now();
        let mut forest = Forest::sized_for_the_host();
        forest.add_focus(focus);
        let inventory = (view.inventory)();
        let listed = view
            .conn
            .list_all_domains(0)
            .map_err(|e| format!("cannot list domains: {}", e.message()))?;
        let listed_at = started.elapsed();
        // Each listed domain from the inventory, or read now: one the inventory lacks (just
        // defined), one vmsnapd changed since it was read, the operation's own.
        // By lower-case UUID, as libvirt spells them (copied only if not): one lookup per
        // listed domain, with no string made for it.
        let known: FxHashMap<std::borrow::Cow<str>, &VmInfo> = inventory
            .iter()
            .flat_map(|k| k.vms.iter())
            .map(|vm| (lower_case(&vm.uuid), &**vm))
            .collect();
        let mut domains: Vec<(DomainTops, bool)> = Vec::with_capacity(listed.len());
        let mut spelled = uuid::Uuid::encode_buffer();
        for dom in &listed {
            let Ok(uuid) = dom.uuid() else {
                continue;
            };
            let key: &str = uuid.hyphenated().encode_lower(&mut spelled);
            let trusted = inventory.as_ref().is_some_and(|k| !k.changed.contains(key))
                && view.own_vm.as_deref() != Some(key);
            match known.get(key).filter(|_| trusted) {
                Some(vm) => domains.push((DomainTops::from_inventory(vm), false)),
                None => {
                    if let Some(now) = read_domain(dom) {
                        domains.push((now, true));
                    }
                }
            }
        }
        forest.inventory = inventory.map(|k| k.vms);
        free_later(listed);
        forest.complete(view, records, focus, domains, started, listed_at, 0)
    }

    /// [`Forest::scan`] again, moments after `self` was scanned in the same operation (after a
    /// merge), without a libvirt call or a `stat` per domain or image: every chain connected to
    /// `focus` in `self` or now is read again, and so is every domain that may have changed
    /// (the operation's own VM, one vmsnapd changed, one using an image at stake or that is
    /// gone); the rest is kept as `self` found it or, when the inventory published a newer
    /// read since (a domain defined, changed or undefined), taken from the inventory. What this
    /// can miss beyond what [`Forest::scan`] can: a domain defined since `self` and not yet in
    /// the inventory, and an image rebased by hand onto an image at stake since `self` (the
    /// same races as just after any scan). Without an inventory it is a [`Forest::scan`].
    pub fn scan_again(
        mut self,
        view: &HostView,
        records: &[Arc<SnapshotRecord>],
        focus: &[&str],
    ) -> Result<Forest, String> {
        let Some(inventory) = (view.inventory)() else {
            return Forest::scan(view, records, focus);
        };
        let started = std::time::Instant::now();
        let at_stake = self.connected_to(focus);
        // The domains to read again, by lower-case UUID.
        let mut reread: BTreeSet<String> = inventory.changed.clone();
        reread.extend(view.own_vm.iter().cloned());
        reread.extend(
            self.tops
                .iter()
                .filter(|t| at_stake.contains(&t.path))
                .map(|t| t.domain_uuid.to_ascii_lowercase()),
        );
        let unchanged = self
            .inventory
            .as_ref()
            .is_some_and(|seen| std::sync::Arc::ptr_eq(seen, &inventory.vms));
        let mut domains: Vec<(DomainTops, bool)> = Vec::new();
        if unchanged {
            // The usual case, moments after `self`: each other domain's disks stay as they are.
            self.tops
                .retain(|t| !reread.contains(lower_case(&t.domain_uuid).as_ref()));
        } else {
            // Each domain as the inventory shows it now that it published a newer read (a
            // domain defined or changed since is taken from there; one it no longer shows is
            // kept as `self` found it: counting an image as used is the safe mistake).
            let mut kept = DomainTops::gather(
                self.tops
                    .drain(..)
                    .filter(|t| !reread.contains(lower_case(&t.domain_uuid).as_ref())),
                |uuid| uuid.to_ascii_lowercase(),
            );
            for vm in inventory.vms.iter() {
                let key = vm.uuid.to_ascii_lowercase();
                if !reread.contains(&key) {
                    kept.insert(key, DomainTops::from_inventory(vm));
                }
            }
            domains.extend(kept.into_values().map(|tops| (tops, false)));
        }
        for uuid in &reread {
            // Gone since: nothing of it to count.
            let now = view
                .conn
                .lookup_domain_by_uuid_string(uuid)
                .ok()
                .as_ref()
                .and_then(read_domain);
            if let Some(now) = now {
                domains.push((now, true));
            }
        }
        self.keep_apart_from(&at_stake);
        let kept = self.nodes.len();
        self.inventory = Some(inventory.vms);
        self.add_focus(focus);
        let listed_at = started.elapsed();
        self.complete(view, records, focus, domains, started, listed_at, kept)
    }

    /// An empty forest with room for as many images as a scan has held.
    fn sized_for_the_host() -> Forest {
        let images = MOST_IMAGES_SCANNED
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(MOST_IMAGES_KEPT_ROOM_FOR);
        Forest {
            nodes: FxHashMap::with_capacity_and_hasher(images, Default::default()),
            ..Forest::default()
        }
    }

    /// Keeps only the chains of the images not in `at_stake` (which holds whole connected
    /// parts, so each kept chain is whole); the files no domain or record names are to be
    /// found again. The domains' disks (`tops`) are left to the caller.
    fn keep_apart_from(&mut self, at_stake: &BTreeSet<String>) {
        self.nodes.retain(|image, _| !at_stake.contains(&**image));
        self.unknown.clear();
    }

    fn add_focus(&mut self, focus: &[&str]) {
        // What the operation is about to release, merge or remove: checked, never trusted.
        let mut headers = chain::checked_reader();
        for image in focus {
            if std::path::Path::new(image).exists() {
                self.read_chain_again(&mut headers, image);
            }
        }
    }

    /// The rest of a scan once the domains are known: their chains and the records' (a chain
    /// whose top the forest holds is taken as it is), the domains using what is at stake read
    /// again, the unknown files next to it.
    #[allow(clippy::too_many_arguments)]
    fn complete(
        self,
        view: &HostView,
        records: &[Arc<SnapshotRecord>],
        focus: &[&str],
        mut domains: Vec<(DomainTops, bool)>,
        started: std::time::Instant,
        listed_at: std::time::Duration,
        kept: usize,
    ) -> Result<Forest, String> {
        let mut forest = self;
        let domains_found = domains.len();
        // One hold of the header cache for every chain: one lock and one look at what changed,
        // not one per image. Released before any libvirt call below.
        let mut headers = chain::reader();
        let (fresh, kept_as_read): (Vec<_>, Vec<_>) = domains.iter().partition(|(_, f)| *f);
        for (_, path) in kept_as_read.iter().flat_map(|(d, _)| &d.disks) {
            forest.add_chain_with(&mut headers, path);
        }
        for record in records {
            for volume in record
                .volumes
                .iter()
                .filter(|v| matches!(v.artifact, Artifact::Qcow2 { .. }))
            {
                if !forest.contains(&volume.image) && std::path::Path::new(&volume.image).exists() {
                    forest.add_chain_with(&mut headers, &volume.image);
                }
            }
        }
        let mut served = headers.served;
        drop(headers);
        // The domains read now (the operation's own VM, those vmsnapd changed, those using
        // what is at stake) are the ones that may have changed: their chains are checked with a
        // `stat`, never trusted to the change feed alone, and read last so that they win.
        let mut headers = chain::checked_reader();
        for (_, path) in fresh.iter().flat_map(|(d, _)| &d.disks) {
            forest.read_chain_again(&mut headers, path);
        }
        served.add(headers.served);
        drop(headers);
        let chains_at = started.elapsed();
        let mut connected = forest.connected_to(focus);
        // A domain shown using the images at stake, or an image that is gone, is read again:
        // the inventory follows libvirt's events, but a disk-only snapshot (`virsh
        // snapshot-create-as --disk-only`) changes a running domain's disks without one.
        // The disks a scan again kept as `self` found them count too: a domain among them seen
        // using what is at stake now is taken out, to be read again with the others.
        let stale_kept: BTreeSet<&str> = forest
            .tops
            .iter()
            .filter(|t| connected.contains(&t.path) || !forest.contains(&t.path))
            .map(|t| t.domain_uuid.as_str())
            .collect();
        if !stale_kept.is_empty() {
            let stale_kept: BTreeSet<String> = stale_kept.into_iter().map(str::to_string).collect();
            let (stale, still): (Vec<DiskTop>, Vec<DiskTop>) = std::mem::take(&mut forest.tops)
                .into_iter()
                .partition(|t| stale_kept.contains(&t.domain_uuid));
            forest.tops = still;
            let taken = DomainTops::gather(stale, str::to_string);
            domains.extend(taken.into_values().map(|tops| (tops, false)));
        }
        let mut reread = false;
        for (tops, fresh) in domains.iter_mut().filter(|(_, fresh)| !*fresh) {
            let stale = tops
                .disks
                .iter()
                .any(|(_, path)| connected.contains(path) || !forest.contains(path));
            if !stale {
                continue;
            }
            reread = true;
            *fresh = true;
            // Not readable now (gone since the listing): kept as the inventory shows it.
            let now = view
                .conn
                .lookup_domain_by_uuid_string(&tops.uuid)
                .ok()
                .as_ref()
                .and_then(read_domain);
            if let Some(now) = now {
                *tops = now;
            }
        }
        if reread {
            let mut headers = chain::checked_reader();
            for (_, path) in domains
                .iter()
                .filter(|(_, fresh)| *fresh)
                .flat_map(|(d, _)| &d.disks)
            {
                forest.read_chain_again(&mut headers, path);
            }
            drop(headers);
            connected = forest.connected_to(focus);
        }
        let read_now = domains.iter().filter(|(_, fresh)| *fresh).count();
        for (d, _) in domains {
            for (target, path) in d.disks {
                forest.tops.push(DiskTop {
                    domain_uuid: d.uuid.clone(),
                    target,
                    path,
                    running: d.running,
                });
            }
        }
        let unknown_from = started.elapsed();
        forest.add_unknown_children(&connected);
        MOST_IMAGES_SCANNED.fetch_max(forest.nodes.len(), std::sync::atomic::Ordering::Relaxed);
        debug!(
            listed_micros = listed_at.as_micros(),
            chains_micros = (chains_at - listed_at).as_micros(),
            reread_micros = (unknown_from - chains_at).as_micros(),
            micros = started.elapsed().as_micros(),
            domains = domains_found,
            images = forest.nodes.len(),
            kept,
            connected = connected.len(),
            read_now,
            trusted = served.trusted,
            checked = served.checked,
            read = served.read,
            "image forest scanned"
        );
        Ok(forest)
    }

    /// The images connected to `focus` by backing links, either way.
    fn connected_to(&self, focus: &[&str]) -> BTreeSet<String> {
        let mut children: FxHashMap<&str, Vec<&str>> = FxHashMap::default();
        for (child, node) in &self.nodes {
            if let Some(parent) = &node.parent {
                children.entry(parent).or_default().push(child);
            }
        }
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut queue: Vec<&str> = focus.to_vec();
        while let Some(image) = queue.pop() {
            if !seen.insert(image.to_string()) {
                continue;
            }
            if let Some(parent) = self.parent(image) {
                queue.push(parent);
            }
            if let Some(kids) = children.get(image) {
                queue.extend(kids.iter().copied());
            }
        }
        seen
    }

    /// Adds the files in the folders of the images connected to the focus that build on one of
    /// them but that no domain or record names: a disk of a VM undefined with `virsh undefine`,
    /// a copy made by hand, another host's VM on a shared folder. Each counts as a child of its
    /// backing image, so that image is neither merged into nor removed while the file exists.
    /// Files in other folders that build on vmsnap's images are not seen.
    fn add_unknown_children(&mut self, connected: &BTreeSet<String>) {
        let folders: BTreeSet<&str> = connected
            .iter()
            .filter_map(|i| match i.rfind('/')? {
                0 => Some("/"),
                slash => Some(&i[..slash]),
            })
            .collect();
        let mut headers = chain::checked_reader();
        for folder in folders {
            let Some(files) = headers.files_in(folder) else {
                continue;
            };
            for name in files.iter() {
                if self.contains(name) {
                    continue;
                }
                let Some(backing) = headers.backing_of(name) else {
                    continue;
                };
                if connected.contains(&backing) {
                    debug!(file = %name, %backing, "a file no domain or record names builds on an image");
                    self.nodes.insert(
                        name.as_str().into(),
                        Node {
                            parent: Some(backing.into()),
                            format: None,
                        },
                    );
                    self.unknown.insert(name.clone());
                }
            }
        }
    }

    #[cfg(test)]
    fn add_chain(&mut self, top: &str) {
        self.add_chain_with(&mut chain::reader(), top);
    }

    fn add_chain_with(&mut self, headers: &mut chain::Reader, top: &str) {
        if self.contains(top) {
            return;
        }
        self.read_chain_again(headers, top);
    }

    /// Reads the chain of `top` even when the forest holds it already: its links replace
    /// those read before.
    fn read_chain_again(&mut self, headers: &mut chain::Reader, top: &str) {
        // Read from the headers: this runs for every disk of every domain on each delete and
        // restore, where a qemu-img process per chain cost seconds on a busy host.
        match headers.links_or_qemu_img(top) {
            Ok(chain) => {
                for (k, image) in chain.iter().enumerate() {
                    let node = self.nodes.entry(image.path.clone()).or_default();
                    // The base keeps a link read before, as it always did.
                    if let Some(below) = chain.get(k + 1) {
                        node.parent = Some(below.path.clone());
                    }
                    node.format = Some(image.format.clone());
                }
            }
            Err(e) => debug!(%top, error = %e, "cannot read a backing chain"),
        }
    }

    /// Takes out an image that was removed.
    fn forget(&mut self, image: &str) {
        self.nodes.remove(image);
        self.unknown.remove(image);
    }

    /// Whether `image` is a file no domain or record names (see `add_unknown_children`).
    pub fn is_unknown(&self, image: &str) -> bool {
        self.unknown.contains(image)
    }

    pub fn contains(&self, image: &str) -> bool {
        self.nodes.contains_key(image)
    }

    pub fn parent(&self, image: &str) -> Option<&str> {
        self.nodes.get(image)?.parent.as_deref()
    }

    pub fn format(&self, image: &str) -> &str {
        self.nodes
            .get(image)
            .and_then(|n| n.format.as_deref())
            .unwrap_or("qcow2")
    }

    pub fn children(&self, image: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.parent.as_deref() == Some(image))
            .map(|(c, _)| c.to_string())
            .collect()
    }

    /// Whether any domain's disk chain includes `image`.
    pub fn in_any_chain(&self, image: &str) -> bool {
        !self.users(image).is_empty()
    }

    /// The domain disks whose chain includes `image`, running or not.
    pub fn users(&self, image: &str) -> Vec<&DiskTop> {
        self.tops
            .iter()
            .filter(|t| {
                let mut cur = Some(t.path.as_str());
                while let Some(p) = cur {
                    if p == image {
                        return true;
                    }
                    cur = self.parent(p);
                }
                false
            })
            .collect()
    }

    /// Running domains whose chain includes `image`.
    pub fn running_users(&self, image: &str) -> Vec<&DiskTop> {
        self.users(image)
            .into_iter()
            .filter(|t| t.running)
            .collect()
    }
}

/// Whether a snapshot or a domain's top claims `image`. Only snapshots that hold data claim
/// their images: a Failed one (never taken, or already partly merged away) does not.
pub fn is_owned(image: &str, forest: &Forest, records: &[Arc<SnapshotRecord>]) -> bool {
    records
        .iter()
        .filter(|r| {
            matches!(
                r.phase,
                SnapshotPhase::Succeeded | SnapshotPhase::InProgress
            )
        })
        .any(|r| r.volumes.iter().any(|v| v.image == image))
        || forest.tops.iter().any(|t| t.path == image)
}

/// Removes `image` and then its backing images, as long as nothing claims them and nothing
/// builds on them.
pub fn prune_unclaimed(
    view: &HostView,
    records: &[Arc<SnapshotRecord>],
    image: &str,
) -> Result<(), String> {
    let mut forest = Forest::scan(view, records, &[image])?;
    prune(&mut forest, records, image)
}

/// [`prune_unclaimed`] on a forest scanned around `image` (or an image it builds on): one scan
/// serves the whole walk, as it covers everything connected to `image`, its backing images
/// included, and the only change along the way is vmsnapd's own removals, which `forest`
/// forgets as they happen.
pub fn prune(
    forest: &mut Forest,
    records: &[Arc<SnapshotRecord>],
    image: &str,
) -> Result<(), String> {
    let mut current = image.to_string();
    loop {
        if !std::path::Path::new(&current).exists()
            || is_owned(&current, forest, records)
            || forest.in_any_chain(&current)
            || !forest.children(&current).is_empty()
        {
            return Ok(());
        }
        let parent = forest.parent(&current).map(str::to_string);
        match std::fs::remove_file(&current) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {current}: {e}")),
        }
        info!(image = %current, "removed an image nothing uses any more");
        forest.forget(&current);
        match parent {
            Some(p) => current = p,
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::qcow2::testing::{qcow2_image, qemu_img};
    use virt::connect::Connect;

    fn image(dir: &std::path::Path, name: &str, backing: Option<&str>) -> String {
        let path = dir.join(name).to_string_lossy().into_owned();
        qcow2_image(&path, backing);
        path
    }

    /// Two chains of two images: `top` on `base` and `other-top` on `other-base`.
    fn two_chains(dir: &std::path::Path) -> [String; 4] {
        let base = image(dir, "base.qcow2", None);
        let top = image(dir, "top.qcow2", Some(&base));
        let other_base = image(dir, "other-base.qcow2", None);
        let other_top = image(dir, "other-top.qcow2", Some(&other_base));
        [base, top, other_base, other_top]
    }

    #[test]
    fn a_second_scan_reads_again_what_is_at_stake_and_borrows_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let [base, top, other_base, other_top] = two_chains(dir.path());
        let mut first = Forest::default();
        first.add_chain(&top);
        first.add_chain(&other_top);
        assert_eq!(first.parent(&other_top), Some(other_base.as_str()));

        // Both tops move onto new backing files after the first scan.
        let moved = image(dir.path(), "moved.qcow2", None);
        let other_moved = image(dir.path(), "other-moved.qcow2", None);
        qemu_img(&["rebase", "-q", "-u", "-b", &moved, "-F", "qcow2", &top]);
        qemu_img(&[
            "rebase",
            "-q",
            "-u",
            "-b",
            &other_moved,
            "-F",
            "qcow2",
            &other_top,
        ]);

        let mut again = first;
        let at_stake = again.connected_to(&[base.as_str()]);
        again.keep_apart_from(&at_stake);
        again.add_chain(&top);
        again.add_chain(&other_top);
        // At stake (connected to the focus): read from the header again.
        assert_eq!(again.parent(&top), Some(moved.as_str()));
        // Apart from it: as the first scan read it, whole, without reading the header again.
        assert_eq!(again.parent(&other_top), Some(other_base.as_str()));
        assert!(again.contains(&other_base));
        assert_eq!(again.format(&other_top), "qcow2");

        // Without a lender every chain is read.
        let mut fresh = Forest::default();
        fresh.add_chain(&other_top);
        assert_eq!(fresh.parent(&other_top), Some(other_moved.as_str()));
    }

    pub(super) fn define(conn: &Connect, name: &str, uuid: &str, disk: &str) -> String {
        let xml = format!(
            "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>1024</memory>\
             <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='qcow2'/><source file='{disk}'/>\
             <target dev='vda' bus='virtio'/></disk></devices></domain>"
        );
        conn.define_domain_xml(&xml).expect("defines");
        xml
    }

    pub(super) fn inventory_of(xmls: &[&str]) -> crate::libvirt::Inventory {
        Arc::new(
            xmls.iter()
                .map(|xml| {
                    Arc::new(
                        parse_domain(xml, vmsnap_api::VmState::ShutOff, &SysfsLvmProbe)
                            .expect("parses"),
                    )
                })
                .collect(),
        )
    }

    /// A view of `conn` whose inventory shows `vms`, none of them changed by vmsnapd.
    pub(super) fn view_with<'a>(
        conn: &'a Connect,
        vms: crate::libvirt::Inventory,
        own: Option<&str>,
    ) -> HostView<'a> {
        HostView {
            conn,
            inventory: Box::new(move || {
                Some(InventoryView {
                    vms: vms.clone(),
                    changed: BTreeSet::new(),
                })
            }),
            own_vm: own.map(str::to_string),
        }
    }

    const OWN: &str = "11111111-1111-4111-8111-111111111111";
    const OTHER: &str = "22222222-2222-4222-8222-222222222222";
    const NEWCOMER: &str = "33333333-3333-4333-8333-333333333333";

    /// After a merge: the operation's own VM and a domain the inventory shows that the scan
    /// before did not list are read again; a domain apart from the images at stake is kept as
    /// the scan before found it.
    #[test]
    fn a_scan_after_a_merge_reads_the_own_vm_and_new_domains_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let [base, top, other_base, other_top] = two_chains(dir.path());
        let conn = Connect::open(Some("test:///default")).expect("test driver opens");
        let own_xml = define(&conn, "own", OWN, &top);
        let other_xml = define(&conn, "other", OTHER, &other_top);
        let seen = inventory_of(&[&own_xml, &other_xml]);
        let current = std::sync::Mutex::new(seen.clone());
        let view = HostView {
            conn: &conn,
            inventory: Box::new(|| {
                Some(InventoryView {
                    vms: current.lock().expect("lock").clone(),
                    changed: BTreeSet::new(),
                })
            }),
            own_vm: Some(OWN.to_string()),
        };
        let first = Forest::scan(&view, &[], &[top.as_str()]).expect("scans");
        assert_eq!(first.users(&top).len(), 1);
        assert_eq!(first.parent(&other_top), Some(other_base.as_str()));

        // The merge: the own VM's disk is `base` now. Someone rebases the other VM's image by
        // hand meanwhile (apart from the images at stake: not read again).
        define(&conn, "own", OWN, &base);
        let moved = image(dir.path(), "moved.qcow2", None);
        qemu_img(&[
            "rebase", "-q", "-u", "-b", &moved, "-F", "qcow2", &other_top,
        ]);
        let again = first
            .scan_again(&view, &[], &[top.as_str()])
            .expect("scans");
        assert!(again.users(&top).is_empty(), "own VM read again");
        assert_eq!(again.users(&base).len(), 1);
        assert_eq!(again.parent(&other_top), Some(other_base.as_str()));
        assert_eq!(again.users(&other_top).len(), 1);

        // A domain defined since, which the inventory has read: read, and `top` is in use.
        let newcomer_xml = define(&conn, "newcomer", NEWCOMER, &top);
        *current.lock().expect("lock") = inventory_of(&[&own_xml, &other_xml, &newcomer_xml]);
        let third = again
            .scan_again(&view, &[], &[top.as_str()])
            .expect("scans");
        assert_eq!(third.users(&top).len(), 1, "the new domain uses top");
        assert_eq!(third.users(&top)[0].domain_uuid, NEWCOMER);
        // The inventory published a newer read: the other VM is taken from it, its chain
        // (apart from the images at stake) still as first read.
        assert_eq!(third.users(&other_top).len(), 1);
        assert_eq!(third.parent(&other_top), Some(other_base.as_str()));
    }

    /// A file made next to the images at stake after a scan, building on one of them, is a file
    /// no domain names for the next scan: the folder's listing kept from the first is dropped.
    #[test]
    fn a_file_made_next_to_the_images_after_a_scan_is_seen_by_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = image(dir.path(), "base.qcow2", None);
        let first_child = image(dir.path(), "first-child.qcow2", Some(&base));
        let conn = Connect::open(Some("test:///default")).expect("test driver opens");
        let view = HostView::reading_all(&conn);
        let first = Forest::scan(&view, &[], &[base.as_str()]).expect("scans");
        assert!(first.is_unknown(&first_child));
        let late_child = image(dir.path(), "late-child.qcow2", Some(&base));
        let second = Forest::scan(&view, &[], &[base.as_str()]).expect("scans");
        assert!(second.is_unknown(&late_child), "seen by the next scan");
        assert_eq!(second.children(&base).len(), 2);
    }

    /// A scan again keeps each other domain's disks as the scan before found them, unless the
    /// domain is found using what is at stake now: then it is read again from libvirt.
    #[test]
    fn a_scan_again_reads_a_kept_domain_again_once_it_uses_what_is_at_stake() {
        const OWN_VM: &str = "66666666-6666-4666-8666-666666666666";
        const OTHER_VM: &str = "77777777-7777-4777-8777-777777777777";
        let dir = tempfile::tempdir().expect("tempdir");
        let own_base = image(dir.path(), "own-base.qcow2", None);
        let own_top = image(dir.path(), "own-top.qcow2", Some(&own_base));
        let other_base = image(dir.path(), "other-base.qcow2", None);
        let other_top = image(dir.path(), "other-top.qcow2", Some(&other_base));
        let conn = Connect::open(Some("test:///default")).expect("test driver opens");
        let own_xml = define(&conn, "stale-own", OWN_VM, &own_top);
        let other_xml = define(&conn, "stale-other", OTHER_VM, &other_top);
        let view = view_with(&conn, inventory_of(&[&own_xml, &other_xml]), Some(OWN_VM));
        let first = Forest::scan(&view, &[], &[own_top.as_str()]).expect("scans");
        assert_eq!(first.users(&other_top).len(), 1);

        // The own VM moves onto a new image on the other VM's base, and the other VM was
        // redefined onto a new top meanwhile (the inventory has not read it yet).
        let bridge = image(dir.path(), "bridge.qcow2", Some(&other_base));
        define(&conn, "stale-own", OWN_VM, &bridge);
        let other_new = image(dir.path(), "other-new.qcow2", Some(&other_base));
        define(&conn, "stale-other", OTHER_VM, &other_new);
        let again = first
            .scan_again(&view, &[], &[bridge.as_str()])
            .expect("scans");
        assert_eq!(again.users(&bridge)[0].domain_uuid, OWN_VM);
        assert_eq!(
            again.users(&other_new).len(),
            1,
            "the other VM, now next to what is at stake, read again"
        );
        assert!(again.users(&other_top).is_empty());
        assert_eq!(again.users(&other_base).len(), 2);
    }

    /// A scan's map of images starts with room for as many as a scan has held: at 513
    /// domains growing it to 1,018 images hashed every path again at each reallocation.
    #[test]
    fn a_scan_starts_with_room_for_the_images_a_scan_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut below = image(dir.path(), "i000.qcow2", None);
        for k in 1..40 {
            below = image(dir.path(), &format!("i{k:03}.qcow2"), Some(&below));
        }
        let conn = Connect::open(Some("test:///default")).expect("test driver opens");
        let forest =
            Forest::scan(&HostView::reading_all(&conn), &[], &[below.as_str()]).expect("scans");
        assert!(forest.nodes.len() >= 40);
        assert!(Forest::sized_for_the_host().nodes.capacity() >= forest.nodes.len());
    }

    /// The thread that frees a listing's handles runs only when a core is idle: it must not
    /// take a core from the operation or libvirtd right after a listing.
    #[test]
    fn listed_handles_are_freed_by_a_thread_that_runs_only_on_idle_cores() {
        free_later(Vec::new());
        let policy_of_freer = || {
            std::fs::read_dir("/proc/self/task")
                .expect("lists the threads")
                .flatten()
                .find(|task| {
                    std::fs::read_to_string(task.path().join("comm"))
                        .is_ok_and(|comm| comm.trim() == "libvirt-free")
                })
                .and_then(|task| std::fs::read_to_string(task.path().join("stat")).ok())
                .and_then(|stat| {
                    // Field 41 (policy), counted from the state, field 3, after the name.
                    let (_, after_name) = stat.rsplit_once(')')?;
                    after_name
                        .split_whitespace()
                        .nth(41 - 3)?
                        .parse::<i32>()
                        .ok()
                })
        };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while policy_of_freer() != Some(libc::SCHED_IDLE) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(policy_of_freer(), Some(libc::SCHED_IDLE));
    }

    /// A domain the inventory still shows but libvirt no longer lists (undefined since the
    /// inventory read it): nothing of it counts as a domain's, and its disk, built on an image
    /// at stake, is a file no domain names (which keeps that image from being merged away).
    /// A guard for any shortcut a scan takes with the inventory (chains read ahead of the
    /// listing were tried and dropped: no faster on two cores).
    #[test]
    fn a_domain_undefined_since_the_inventory_read_it_leaves_its_disk_unknown() {
        const KEPT: &str = "44444444-4444-4444-8444-444444444444";
        const GONE: &str = "55555555-5555-4555-8555-555555555555";
        let dir = tempfile::tempdir().expect("tempdir");
        let base = image(dir.path(), "base.qcow2", None);
        let kept_top = image(dir.path(), "kept-top.qcow2", Some(&base));
        let gone_top = image(dir.path(), "gone-top.qcow2", Some(&base));
        let conn = Connect::open(Some("test:///default")).expect("test driver opens");
        let kept_xml = define(&conn, "kept", KEPT, &kept_top);
        let gone_xml = define(&conn, "gone", GONE, &gone_top);
        conn.lookup_domain_by_name("gone")
            .and_then(|d| d.undefine())
            .expect("undefines");
        let view = view_with(&conn, inventory_of(&[&kept_xml, &gone_xml]), None);
        let forest = Forest::scan(&view, &[], &[base.as_str()]).expect("scans");
        assert!(forest.is_unknown(&gone_top), "a disk no domain names");
        assert!(forest.users(&gone_top).is_empty());
        assert_eq!(
            forest.users(&base).len(),
            1,
            "only the listed domain uses base"
        );
        assert_eq!(forest.users(&kept_top)[0].domain_uuid, KEPT);
        assert_eq!(forest.children(&base).len(), 2);
    }
}

#[cfg(test)]
mod measure {
    use super::tests::{define, inventory_of, view_with};
    use super::*;
    use crate::backends::qcow2::testing::qcow2_image;
    use std::time::Instant;
    use virt::connect::Connect;

    /// The scale benchmark's 513 domains' disks in `dir`: 10 chains of 51 images (their tops
    /// first, named `c*`), then 500 one-image disks (`p*`).
    fn bench_host_tops(dir: &std::path::Path) -> Vec<String> {
        let mut tops = Vec::new();
        for k in 0..10 {
            let mut below = dir.join(format!("c{k}-50.qcow2"));
            qcow2_image(&below.to_string_lossy(), None);
            for d in (0..50).rev() {
                let path = dir.join(format!("c{k}-{d:02}.qcow2"));
                qcow2_image(&path.to_string_lossy(), Some(&below.to_string_lossy()));
                below = path;
            }
            tops.push(below.to_string_lossy().into_owned());
        }
        let one = dir.join("p000.qcow2");
        qcow2_image(&one.to_string_lossy(), None);
        let bytes = std::fs::read(&one).expect("read");
        for k in 0..500 {
            let path = dir.join(format!("p{k:03}.qcow2"));
            std::fs::write(&path, &bytes).expect("write");
            tops.push(path.to_string_lossy().into_owned());
        }
        tops
    }

    /// A whole scan at 510 domains of the test driver (500 with a one-image disk, 10 on chains
    /// of 51 images), every domain vouched for by the inventory: what a scan costs per domain
    /// beyond its chain. Run with
    /// `cargo test -p vmsnapd --release -- --ignored --nocapture measure_a_full_scan`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_a_full_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = Connect::open(Some("test:///default")).expect("test driver opens");
        for dom in conn.list_all_domains(0).expect("lists") {
            let _ = dom.destroy();
            let _ = dom.undefine();
        }
        let xmls: Vec<String> = bench_host_tops(dir.path())
            .iter()
            .enumerate()
            .map(|(k, top)| {
                let uuid = format!("aaaaaaaa-0000-4000-8000-{k:012}");
                define(&conn, &format!("d{k}"), &uuid, top)
            })
            .collect();
        let refs: Vec<&str> = xmls.iter().map(String::as_str).collect();
        let view = view_with(&conn, inventory_of(&refs), None);
        // Settled: the cache keeps only files changed 2 s before.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let focus = dir
            .path()
            .join("c0-00.qcow2")
            .to_string_lossy()
            .into_owned();
        Forest::scan(&view, &[], &[focus.as_str()]).expect("scans");
        const RUNS: u32 = 200;
        let start = Instant::now();
        for _ in 0..RUNS {
            let forest = Forest::scan(&view, &[], &[focus.as_str()]).expect("scans");
            assert_eq!(forest.tops.len(), 510);
        }
        let scanned = start.elapsed() / RUNS;
        let start = Instant::now();
        for _ in 0..RUNS {
            drop(view.conn.list_all_domains(0).expect("lists"));
        }
        let listed = start.elapsed() / RUNS;
        println!(
            "510 domains: a scan {scanned:?}; a listing, its handles freed at once, {listed:?} \
             (means of {RUNS})"
        );
    }

    /// A forest's chains as the scale benchmark's 513 domains give them (500 one-image disks,
    /// 10 chains of 51 images): the chain reading alone against the whole build of the forest.
    /// Run with `cargo test -p vmsnapd --release -- --ignored --nocapture measure_a_forest_build`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_a_forest_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tops = bench_host_tops(dir.path());
        // Settled: the cache keeps only files changed 2 s before.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        for top in &tops {
            chain::backing_chain_or_qemu_img(top).expect("reads");
        }
        const RUNS: u32 = 50;
        let start = Instant::now();
        for _ in 0..RUNS {
            let mut headers = chain::reader();
            for top in &tops {
                headers.backing_chain_or_qemu_img(top).expect("reads");
            }
        }
        let read = start.elapsed() / RUNS;
        let start = Instant::now();
        for _ in 0..RUNS {
            let mut forest = Forest::default();
            let mut headers = chain::reader();
            for top in &tops {
                forest.add_chain_with(&mut headers, top);
            }
            drop(headers);
            assert_eq!(forest.nodes.len(), 1010);
        }
        let built = start.elapsed() / RUNS;
        println!(
            "{} chains: read {read:?}, forest built (and dropped) {built:?} (means of {RUNS})",
            tops.len()
        );
    }
}
