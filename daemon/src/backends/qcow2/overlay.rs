//! A snapshot's new qcow2 overlay, written by vmsnapd itself: the file
//! `qemu-img create -f qcow2 -u -b BACKING -F FORMAT OVERLAY SIZE` makes (QEMU 7.2, 64 KiB
//! clusters), byte for byte, without starting a process (13-17 ms per disk before the freeze;
//! issue 13).
//!
//! The image is empty: every read falls through to the backing file. Its four clusters, as
//! qemu-img lays them out:
//!
//! | cluster | content |
//! |---|---|
//! | 0 | header (v3, 112 bytes), backing format and feature name table extensions, backing name |
//! | 1 | refcount table: one entry, the refcount block |
//! | 2 | refcount block: refcount 1 for the metadata clusters (0, 1, 2 and the L1 table's) |
//! | 3.. | L1 table, all zero (no L2 table yet); the file ends with its last entry |

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use super::header::{EXT_BACKING_FORMAT, MAGIC, MAX_BACKING_NAME};
use crate::files;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Bytes of guest data one L1 entry maps: an L2 table of CLUSTER / 8 entries, a cluster each.
const L1_ENTRY_SPAN: u64 = CLUSTER * (CLUSTER / 8);
/// QEMU's limit on the L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB): 2 PiB with 64 KiB clusters.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// qcow2 images are a whole number of 512-byte sectors; qemu-img rounds the size up.
const SECTOR: u64 = 512;
/// The v3 header QEMU writes since 5.1: the 104 bytes of v3 plus the compression type, padded.
const HEADER_LENGTH: u32 = 112;
/// 16-bit refcounts, QEMU's default.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNT_TABLE: u64 = CLUSTER;
const REFCOUNT_BLOCK: u64 = 2 * CLUSTER;
const L1_TABLE: u64 = 3 * CLUSTER;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// The feature name table QEMU 7.2 writes into every v3 header, in its order: (type, bit, name).
/// Type 0 incompatible, 1 compatible, 2 autoclear.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
const FEATURE_NAME_LEN: usize = 46;
/// The backing formats a disk of the qcow2 backend has (`disks::classify`).
const BACKING_FORMATS: [&str; 2] = ["qcow2", "raw"];

/// Why an overlay was not made. Nothing is left behind: a file vmsnapd created is removed again.
/// Each message says what failed on the overlay once: callers add only which disk.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The backing name, format or size cannot go into a qcow2 header as qemu-img would write it.
    #[error("cannot create the overlay: {0}")]
    Invalid(String),
    /// Something is at the overlay's path already, or the file could not be made.
    #[error(transparent)]
    NewFile(#[from] files::NewFileError),
    /// The one cause worth naming apart: the user can act on it.
    #[error(
        "cannot write the overlay {path}: no space left on device (free some space where the \
         VM's images are, then try again)"
    )]
    NoSpace { path: String },
    #[error("cannot write the overlay {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Creates `overlay`, an empty qcow2 image of `size` bytes (rounded up to a sector, as
/// qemu-img does) on top of `backing` in format `backing_format`, without opening `backing`
/// (a running QEMU writes it). The file is new (`O_EXCL`, a symlink there is not followed) with
/// the permission bits of `backing`, and durable when this returns: written, fsync'd, and its
/// directory entry fsync'd too, since libvirt is about to point the VM at it. On any failure a
/// file this call created is removed.
pub fn create(
    overlay: &str,
    backing: &str,
    backing_format: &str,
    size: u64,
) -> Result<(), OverlayError> {
    create_with(overlay, backing, backing_format, size, Layout::write)
}

/// [`create`], with the step that fills the new file given (tests make it fail).
fn create_with(
    overlay: &str,
    backing: &str,
    backing_format: &str,
    size: u64,
    write: impl FnOnce(&Layout, File) -> io::Result<()>,
) -> Result<(), OverlayError> {
    let image = Layout::new(backing, backing_format, size)?;
    let path = Path::new(overlay);
    let file = files::create_new_image(overlay, backing)?;
    let written = write(&image, file)
        .and_then(|()| sync_parent(path))
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => OverlayError::NoSpace {
                path: overlay.to_string(),
            },
            _ => OverlayError::Write {
                path: overlay.to_string(),
                source,
            },
        });
    if written.is_err() {
        // Ours (created just above), and useless half written.
        let _ = std::fs::remove_file(path);
    }
    written
}

/// The directory entry of a new file survives a crash only once its directory is synced.
fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// What goes into the file, checked.
struct Layout {
    /// Clusters 0-2: header, refcount table, refcount block.
    metadata: Vec<u8>,
    /// The L1 table's length in bytes (zeros), written after the metadata.
    l1_bytes: u64,
}

impl Layout {
    fn new(backing: &str, backing_format: &str, size: u64) -> Result<Layout, OverlayError> {
        let invalid = |m: String| Err(OverlayError::Invalid(m));
        let name = backing.as_bytes();
        // A relative name would be resolved against the overlay's folder, and one with a colon
        // could be read by QEMU as a protocol (`nbd:`, `json:`): the disk's own absolute path
        // is what the overlay must name.
        if !backing.starts_with('/') {
            return invalid(format!(
                "the backing file {} is not an absolute path",
                vmsnap_api::excerpt(backing)
            ));
        }
        if name.contains(&0) {
            return invalid(format!(
                "the backing file name {} contains a NUL byte",
                vmsnap_api::excerpt(backing)
            ));
        }
        if name.len() > MAX_BACKING_NAME as usize {
            return invalid(format!(
                "the backing file name is {} bytes long; qcow2 allows at most {MAX_BACKING_NAME}",
                name.len()
            ));
        }
        if !BACKING_FORMATS.contains(&backing_format) {
            return invalid(format!(
                "backing format {} is not one of qcow2 and raw",
                vmsnap_api::excerpt(backing_format)
            ));
        }
        let too_large = || {
            OverlayError::Invalid(format!(
                "a virtual size of {size} bytes is more than a qcow2 image with 64 KiB clusters \
                 holds"
            ))
        };
        let size = size
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(too_large)?;
        let l1_entries = size.div_ceil(L1_ENTRY_SPAN);
        if l1_entries > MAX_L1_ENTRIES {
            return Err(too_large());
        }
        let l1_bytes = l1_entries * 8;
        let l1_clusters = l1_bytes.div_ceil(CLUSTER);

        let mut header = Vec::with_capacity(1024 + name.len());
        let put32 = |h: &mut Vec<u8>, v: u32| h.extend_from_slice(&v.to_be_bytes());
        let put64 = |h: &mut Vec<u8>, v: u64| h.extend_from_slice(&v.to_be_bytes());
        let extensions = extension(EXT_BACKING_FORMAT, backing_format.as_bytes())
            .into_iter()
            .chain(extension(EXT_FEATURE_TABLE, &feature_table()))
            .chain(extension(0, &[]))
            .collect::<Vec<u8>>();
        let name_offset = u64::from(HEADER_LENGTH) + extensions.len() as u64;
        header.extend_from_slice(MAGIC);
        put32(&mut header, 3); // version
        put64(&mut header, name_offset);
        put32(&mut header, name.len() as u32); // at most 1023, checked above
        put32(&mut header, CLUSTER_BITS);
        put64(&mut header, size);
        put32(&mut header, 0); // no encryption
        put32(&mut header, l1_entries as u32); // at most 4 Mi, checked above
        put64(&mut header, if l1_entries == 0 { 0 } else { L1_TABLE });
        put64(&mut header, REFCOUNT_TABLE);
        put32(&mut header, 1); // refcount table clusters
        put32(&mut header, 0); // snapshots
        put64(&mut header, 0); // snapshots offset
        put64(&mut header, 0); // incompatible features: none (not dirty, zlib, no data file)
        put64(&mut header, 0); // compatible features: none (no lazy refcounts)
        put64(&mut header, 0); // autoclear features: none
        put32(&mut header, REFCOUNT_ORDER);
        put32(&mut header, HEADER_LENGTH);
        header.push(0); // compression type zlib
        header.resize(HEADER_LENGTH as usize, 0);
        header.extend_from_slice(&extensions);
        header.extend_from_slice(name);

        // Clusters 0, 1, 2 and the L1 table's: a few hundred at most, in one refcount block.
        let mut metadata = vec![0u8; 3 * CLUSTER as usize];
        metadata[..header.len()].copy_from_slice(&header);
        let table = REFCOUNT_TABLE as usize;
        metadata[table..table + 8].copy_from_slice(&REFCOUNT_BLOCK.to_be_bytes());
        let block = REFCOUNT_BLOCK as usize;
        for cluster in 0..3 + l1_clusters as usize {
            metadata[block + 2 * cluster..block + 2 * cluster + 2]
                .copy_from_slice(&1u16.to_be_bytes());
        }
        Ok(Layout { metadata, l1_bytes })
    }

    /// Writes the whole image into `file` and syncs it.
    fn write(&self, mut file: File) -> io::Result<()> {
        file.write_all(&self.metadata)?;
        // The L1 table written as zeros, as qemu-img writes it, not left as a hole.
        let zeros = [0u8; 64 << 10];
        let mut left = self.l1_bytes;
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            file.write_all(&zeros[..n as usize])?;
            left -= n;
        }
        file.sync_all()
    }
}

/// A header extension: type, length, data padded to 8 bytes.
fn extension(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len().next_multiple_of(8));
    out.extend_from_slice(&kind.to_be_bytes());
    // The backing format (checked) or the feature table: a few hundred bytes.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(8 + data.len().next_multiple_of(8), 0);
    out
}

fn feature_table() -> Vec<u8> {
    let mut table = Vec::with_capacity(FEATURE_NAMES.len() * (2 + FEATURE_NAME_LEN));
    for (kind, bit, name) in FEATURE_NAMES {
        table.push(kind);
        table.push(bit);
        let mut field = [0u8; FEATURE_NAME_LEN];
        field[..name.len()].copy_from_slice(name.as_bytes());
        table.extend_from_slice(&field);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Output};

    fn run(program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} runs: {e}"))
    }

    fn ok(program: &str, args: &[&str]) -> String {
        let out = run(program, args);
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn s(p: &Path) -> &str {
        p.to_str().expect("utf-8")
    }

    /// `qemu-img check` finds nothing: no leak, no corruption, refcounts right.
    fn check_clean(image: &Path) {
        let out = run("qemu-img", &["check", "--output", "json", s(image)]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "qemu-img check {image:?}: {out:?}");
        let report: serde_json::Value = serde_json::from_str(&text).expect("check json");
        for key in ["corruptions", "leaks", "check-errors"] {
            let count = report.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
            assert_eq!(count, 0, "{key} in {text}");
        }
    }

    fn info(image: &Path) -> serde_json::Value {
        let text = ok("qemu-img", &["info", "-U", "--output", "json", s(image)]);
        serde_json::from_str(&text).expect("info json")
    }

    fn sha(path: &Path) -> String {
        ok("sha256sum", &[s(path)])
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The guest's view of `image` as a raw file.
    fn read_through(image: &Path, out: &Path) -> String {
        ok(
            "qemu-img",
            &["convert", "-U", "-O", "raw", s(image), s(out)],
        );
        sha(out)
    }

    fn qemu_img_major() -> u32 {
        let version = ok("qemu-img", &["--version"]);
        version
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn matches_qemu_img_byte_for_byte() {
        // QEMU 7.2 (Debian 12) is the version this writer mirrors; others lay the header out
        // alike but may write another feature table.
        if qemu_img_major() != 7 {
            eprintln!("skipped: the byte comparison needs qemu-img 7.x");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let long = format!("/{}", "b".repeat(1022));
        let base = dir.path().join("base.qcow2");
        let base = s(&base);
        let cases: &[(&str, &str, u64)] = &[
            (base, "qcow2", 16 << 20),
            (base, "raw", 0),
            (base, "qcow2", 512),
            (base, "qcow2", 1000),
            (base, "raw", L1_ENTRY_SPAN),
            (base, "raw", L1_ENTRY_SPAN + 1),
            (base, "qcow2", 64 << 30),
            (base, "qcow2", 5 << 40),
            (base, "qcow2", 1 << 51),
            ("/x", "qcow2", 1 << 30),
            (&long, "raw", 3 << 30),
        ];
        for (i, &(backing, format, size)) in cases.iter().enumerate() {
            let ours = dir.path().join(format!("ours-{i}.qcow2"));
            let theirs = dir.path().join(format!("theirs-{i}.qcow2"));
            let size_arg = size.to_string();
            ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-u",
                    "-b",
                    backing,
                    "-F",
                    format,
                    s(&theirs),
                    &size_arg,
                ],
            );
            // Written straight from the layout: `create` would need the backing file (for its
            // mode), and these names are only names.
            let file = std::fs::File::create_new(&ours).expect("new file");
            Layout::new(backing, format, size)
                .expect("valid")
                .write(file)
                .expect("written");
            let (a, b) = (
                std::fs::read(&ours).expect("read"),
                std::fs::read(&theirs).expect("read"),
            );
            assert!(
                a == b,
                "case {i} ({format}, {size}): differs from qemu-img's"
            );
        }
    }

    #[test]
    fn qemu_reads_the_backing_data_through_it_and_writes_into_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        // A raw backing with known bytes, and a qcow2 one made from it.
        let raw = p("base.raw");
        let mut data = Vec::with_capacity(3 << 20);
        for i in 0..(3u32 << 20) {
            data.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
        }
        std::fs::write(&raw, &data).expect("write");
        let qcow = p("base.qcow2");
        ok(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow)],
        );
        for (image, mode) in [(&raw, 0o640), (&qcow, 0o600)] {
            std::fs::set_permissions(image, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let expected = sha(&raw);
        for (backing, format) in [(&raw, "raw"), (&qcow, "qcow2")] {
            let top = p(&format!("top-{format}.qcow2"));
            create(s(&top), s(backing), format, data.len() as u64).expect("created");
            check_clean(&top);
            let info = info(&top);
            assert_eq!(info["format"], "qcow2");
            assert_eq!(info["virtual-size"], data.len() as u64);
            assert_eq!(info["cluster-size"], 65536);
            assert_eq!(info["backing-filename"], s(backing));
            assert_eq!(info["full-backing-filename"], s(backing));
            assert_eq!(info["backing-filename-format"], format);
            assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
            assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], false);
            assert_eq!(info["format-specific"]["data"]["refcount-bits"], 16);
            assert_eq!(info["format-specific"]["data"]["corrupt"], false);
            assert_eq!(
                super::super::chain::backing_of(s(&top)).as_deref(),
                Some(s(backing)),
                "vmsnapd's own header reader follows it too"
            );
            let mode = |f: &Path| std::fs::metadata(f).expect("stat").permissions().mode() & 0o7777;
            assert_eq!(
                mode(&top),
                mode(backing),
                "the overlay is as open as its image"
            );

            assert_eq!(read_through(&top, &p("read.raw")), expected);
            ok("qemu-img", &["compare", "-q", s(&top), s(&raw)]);

            // The VM's writes land in the overlay; the backing stays as it was.
            ok(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 0xab 1M 192k", s(&top)],
            );
            ok(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 0xcd 2047k 2k", s(&top)],
            );
            check_clean(&top);
            let mut changed = data.clone();
            changed[1 << 20..(1 << 20) + (192 << 10)].fill(0xab);
            changed[2047 << 10..2049 << 10].fill(0xcd);
            std::fs::write(p("expected.raw"), &changed).expect("write");
            assert_eq!(read_through(&top, &p("read.raw")), sha(&p("expected.raw")));
            assert_eq!(sha(&raw), expected, "the backing file is never written");
        }
    }

    #[test]
    fn refuses_what_qemu_img_would_not_write_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, b"").expect("write");
        let base = s(&base);
        let top = dir.path().join("top.qcow2");
        let refused = |backing: &str, format: &str, size: u64| {
            let error = create(s(&top), backing, format, size).expect_err("refused");
            assert!(matches!(error, OverlayError::Invalid(_)), "{error}");
            assert!(!files::path_taken(&top), "nothing created");
            error.to_string()
        };
        let long = format!("/{}", "b".repeat(MAX_BACKING_NAME as usize));
        assert!(refused(&long, "raw", 1 << 20).contains("1024 bytes long"));
        assert!(refused("base.raw", "raw", 1 << 20).contains("not an absolute path"));
        assert!(refused("/a\0b", "raw", 1 << 20).contains("NUL byte"));
        let odd = refused(base, "vmdk\u{1b}", 1 << 20);
        assert!(odd.contains("vmdk\\u{1b}"), "escaped: {odd}");
        refused(base, "", 1 << 20);
        assert!(refused(base, "raw", (1 << 51) + 1).contains("more than a qcow2 image"));
        refused(base, "raw", u64::MAX);
        // The largest names and sizes that fit are taken.
        let longest = format!("/{}", "b".repeat(MAX_BACKING_NAME as usize - 1));
        assert!(Layout::new(&longest, "raw", 1 << 51).is_ok());

        // Never over an existing file or through a symlink; the file there is untouched. The
        // messages name the overlay's path as given.
        use files::NewFileError::{Create, Exists};
        std::fs::write(&top, b"precious").expect("write");
        let error = create(s(&top), base, "raw", 1 << 20).expect_err("exists");
        assert!(
            matches!(error, OverlayError::NewFile(Exists { .. })),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            format!("the overlay {} already exists", s(&top))
        );
        assert_eq!(std::fs::read(&top).expect("read"), b"precious");
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).expect("symlink");
        let error = create(s(&link), base, "raw", 1 << 20).expect_err("a symlink");
        assert!(
            matches!(error, OverlayError::NewFile(Exists { .. })),
            "{error}"
        );
        assert!(!dir.path().join("nowhere").exists());
        // A folder that is not there: nothing is made.
        let nowhere = dir.path().join("no/top.qcow2");
        let error = create(s(&nowhere), base, "raw", 1 << 20).expect_err("no folder");
        assert!(
            matches!(error, OverlayError::NewFile(Create { .. })),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "cannot create the overlay {}: No such file or directory (os error 2)",
                s(&nowhere)
            )
        );
    }

    #[test]
    fn a_failed_write_removes_the_file_and_names_a_full_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, b"").expect("write");
        let top = dir.path().join("top.qcow2");
        // /dev/full fails every write with ENOSPC, as a full disk would.
        let write_to_full = |layout: &Layout, _file: File| {
            let full = std::fs::OpenOptions::new().write(true).open("/dev/full")?;
            layout.write(full)
        };
        let error =
            create_with(s(&top), s(&base), "raw", 1 << 20, write_to_full).expect_err("no space");
        assert!(matches!(error, OverlayError::NoSpace { .. }), "{error}");
        assert!(error.to_string().contains("free some space"), "{error}");
        assert!(!files::path_taken(&top), "the half-made file is gone");
        let broken = |_: &Layout, _: File| Err(io::Error::from_raw_os_error(libc::EIO));
        let error = create_with(s(&top), s(&base), "raw", 1 << 20, broken).expect_err("EIO");
        assert!(matches!(error, OverlayError::Write { .. }), "{error}");
        assert!(!files::path_taken(&top), "the half-made file is gone");
        create(s(&top), s(&base), "raw", 1 << 20).expect("and then it works");
        check_clean(&top);
    }
}
