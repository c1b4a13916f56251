//! Bounded fuzzing of every parser of input vmsnapd does not control: records read from the
//! state folder, libvirt's domain XML, qemu-img's JSON, qcow2 headers (and, in `bus::manager`,
//! D-Bus option dicts). Each run mutates realistic seeds a few thousand times; the parsers must answer `Ok` or
//! `Err`, never panic, and what they accept must keep the invariants callers rely on.

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};

use crate::backends::qcow2::chain::{self, FileBytes};
use crate::backends::qcow2::qemu_img;
use crate::domain;
use crate::store;

/// Cases per target: enough to reach every branch of these small parsers, a second or two each.
const CASES: u32 = 3000;

pub(crate) fn config() -> Config {
    Config {
        cases: CASES,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        // The same cases on every run: a suite run either passes or fails, never now and then.
        rng_seed: RngSeed::Fixed(0x766d_736e_6170),
        ..Config::default()
    }
}

/// Fragments worth splicing into XML and JSON: structure, quoting, paths, odd numbers.
const TOKENS: &[&str] = &[
    "<",
    ">",
    "/>",
    "</disk>",
    "<disk type='file' device='disk'>",
    "<source file='",
    "'",
    "\"",
    "<target dev='vda'/>",
    "<backingStore/>",
    "&amp;",
    "&#0;",
    "<!--",
    "]]>",
    "..",
    "/",
    "\0",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-1",
    "1e999",
    "18446744073709551616",
    "\"\"",
    "\u{202e}",
    "\u{1b}[2J",
    "\n",
    "ü",
];

/// One of `seeds`, edited up to 8 times (insert a byte or a token, delete, replace, truncate).
pub(crate) fn mutated(seeds: Vec<String>) -> impl Strategy<Value = String> {
    let count = seeds.len();
    (
        0..count,
        prop::collection::vec((any::<u16>(), 0u8..5, any::<u8>()), 0..8),
    )
        .prop_map(move |(seed, edits)| {
            let mut bytes = seeds[seed].as_bytes().to_vec();
            for (position, op, value) in edits {
                let at = usize::from(position) % (bytes.len() + 1);
                match op {
                    0 => bytes.insert(at, value),
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    2 if at < bytes.len() => bytes[at] = value,
                    3 => {
                        let token = TOKENS[usize::from(value) % TOKENS.len()].as_bytes();
                        bytes.splice(at..at, token.iter().copied());
                    }
                    _ => bytes.truncate(at.max(bytes.len() / 2)),
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
}

/// One of `seeds`, its bytes edited up to 8 times (set, insert, delete, truncate, or a field
/// made extreme): binary input, which [`mutated`]'s text round trip would mangle.
fn mutated_bytes(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = seeds.len();
    (
        0..count,
        prop::collection::vec((any::<u16>(), 0u8..5, any::<u8>()), 0..8),
    )
        .prop_map(move |(seed, edits)| {
            let mut bytes = seeds[seed].clone();
            for (position, op, value) in edits {
                // Most fields that matter are in the first few hundred bytes.
                let at = usize::from(position) % (bytes.len().min(512) + 1);
                match op {
                    0 if at < bytes.len() => bytes[at] = value,
                    1 => bytes.insert(at, value),
                    2 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    3 if at + 4 <= bytes.len() => {
                        let extreme = [0u32, 1, 0x7fff_ffff, u32::MAX][usize::from(value % 4)];
                        bytes[at..at + 4].copy_from_slice(&extreme.to_be_bytes());
                    }
                    _ => bytes.truncate(at),
                }
            }
            bytes
        })
}

/// A qcow2 header as qemu-img writes one (version 3, or 2): a backing format extension, the
/// end extension, then the backing file name.
fn qcow2_seed(version: u32) -> Vec<u8> {
    let header_len: u32 = if version == 2 { 72 } else { 112 };
    let name = b"../images/base.qcow2";
    let name_offset = u64::from(header_len) + 16 + 8;
    let mut b = Vec::new();
    b.extend_from_slice(b"QFI\xfb");
    b.extend_from_slice(&version.to_be_bytes());
    b.extend_from_slice(&name_offset.to_be_bytes());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(&16u32.to_be_bytes()); // cluster bits
    b.resize(72, 0);
    if version == 3 {
        b.resize(100, 0); // no incompatible features; refcount order 0 (not read)
        b.extend_from_slice(&header_len.to_be_bytes());
        b.resize(header_len as usize, 0);
    }
    b.extend_from_slice(&0xe279_2acau32.to_be_bytes());
    b.extend_from_slice(&5u32.to_be_bytes());
    b.extend_from_slice(b"qcow2\0\0\0");
    b.extend_from_slice(&[0; 8]); // the end extension
    b.extend_from_slice(name);
    b.resize(4096, 0);
    b
}

struct NoLvm;
impl crate::disks::LvmProbe for NoLvm {
    fn is_logical_volume(&self, _dev: &std::path::Path) -> bool {
        false
    }
}

const DOMAIN_XML: &str = "<domain type='qemu'><name>web</name>\
    <uuid>0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11</uuid><os><type>hvm</type>\
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>\
    <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os><devices>\
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
    <source file='/i/top.qcow2'/><backingStore type='file'><format type='qcow2'/>\
    <source file='/i/base.qcow2'/></backingStore><target dev='vda' bus='virtio'/></disk>\
    <disk type='block' device='disk'><source dev='/dev/vg0/data'/><target dev='vdb'/></disk>\
    <disk type='file' device='cdrom'><source file='/i/seed.iso'/><target dev='sda'/>\
    <readonly/></disk><disk type='network' device='disk'><source protocol='rbd' name='p/i'/>\
    <target dev='vdc'/></disk>\
    <interface type='network'><mac address='52:54:00:12:34:56'/></interface>\
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' \
    state='connected'/></channel><tpm model='tpm-crb'><backend type='emulator' \
    version='2.0'/></tpm></devices></domain>";

const CHAIN_JSON: &str = r#"[{"virtual-size": 67108864, "filename": "/i/top.qcow2",
    "format": "qcow2", "backing-filename": "/i/base.qcow2", "full-backing-filename":
    "/i/base.qcow2", "backing-filename-format": "qcow2"}, {"virtual-size": 67108864,
    "filename": "/i/base.qcow2", "format": "raw"}]"#;

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_domain_xml(xml in mutated(vec![DOMAIN_XML.to_string()])) {
        if let Ok(vm) = domain::parse_domain(&xml, vmsnap_api::VmState::Running, &NoLvm) {
            prop_assert!(!vm.name.is_empty() && !vm.uuid.is_empty());
        }
        let _ = domain::extra_state(&xml, "0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11");
        let _ = domain::disk_source(&xml, "vda");
        if let Ok(edited) = domain::set_disk_source(&xml, "vda", "/i/new.qcow2", "qcow2") {
            prop_assert!(roxmltree::Document::parse(&edited).is_ok(), "{}", edited);
        }
        if let Ok(new) = domain::for_new_vm(&xml, "web", "web-copy", Some("/n/VARS.fd")) {
            prop_assert!(roxmltree::Document::parse(&new).is_ok(), "{}", new);
        }
    }

    #[test]
    fn fuzz_snapshot_records(text in mutated(record_seeds())) {
        if let Ok(record) = store::parse_snapshot_record(text.as_bytes()) {
            for uuid in [record.uuid.as_str(), &*record.vm_uuid] {
                prop_assert!(!uuid.contains('/') && !uuid.is_empty() && uuid != "..");
            }
            let _ = record.included_volumes();
        }
    }

    #[test]
    fn fuzz_restore_records(text in mutated(vec![restore_seed()])) {
        if let Ok(record) = store::parse_restore_record(text.as_bytes()) {
            prop_assert!(!record.uuid.contains('/') && !record.vm_uuid.contains('/'));
        }
    }

    #[test]
    fn fuzz_qcow2_headers(bytes in mutated_bytes(vec![qcow2_seed(3), qcow2_seed(2)])) {
        for format in [None, Some("qcow2")] {
            if let Ok(image) = chain::read_image(&FileBytes::of(&bytes), format) {
                prop_assert!(image.format == "qcow2" || image.format == "raw");
                if let Some((name, backing_format)) = &image.backing {
                    prop_assert!(!name.is_empty() && name.len() <= 1023 && !name.contains(&0));
                    prop_assert!(backing_format.as_ref().is_none_or(|f| f.len() <= 15));
                    if let Ok(path) = chain::resolve("/i/top.qcow2", name) {
                        prop_assert!(path.starts_with('/'), "{}", path);
                    }
                }
            }
        }
    }

    #[test]
    fn fuzz_qemu_img_chain(text in mutated(vec![CHAIN_JSON.to_string()])) {
        let _ = qemu_img::parse_chain(&text);
    }
}

fn record_seeds() -> Vec<String> {
    let mut record = store::tests::record("a");
    record.uuid = "5c1d7a9e-0000-4000-8000-000000000001".into();
    record.vm_uuid = "0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11".into();
    let plain = serde_json::to_string(&record).unwrap_or_default();
    record.domain_xml = crate::store::DomainXml::Held(DOMAIN_XML.to_string());
    let with_xml = serde_json::to_string_pretty(&record).unwrap_or_default();
    vec![plain, with_xml]
}

fn restore_seed() -> String {
    r#"{"version":1,"uuid":"7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182","vmName":"web",
    "vmUuid":"0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11","snapshotName":"s",
    "snapshotUuid":"5c1d7a9e-0000-4000-8000-000000000001","targetName":"web","targetUuid":"",
    "newVm":false,"stopTarget":false,"start":false,"takeSafetySnapshot":true,
    "phase":"InProgress","complete":false,"creationTime":"2026-11-26T15:00:00Z",
    "restoreTime":"","restores":[],"detached":[],"notRestored":[],"safetySnapshot":"",
    "error":"","step":{"step":"applying","previousXml":"<domain/>"}}"#
        .to_string()
}

#[test]
fn seeds_are_accepted_as_they_are() {
    // A fuzz run from seeds the parsers refuse would only exercise their first error.
    assert!(domain::parse_domain(DOMAIN_XML, vmsnap_api::VmState::Running, &NoLvm).is_ok());
    for seed in record_seeds() {
        assert!(
            store::parse_snapshot_record(seed.as_bytes()).is_ok(),
            "{seed}"
        );
    }
    let restore = restore_seed();
    let parsed = store::parse_restore_record(restore.as_bytes());
    assert!(parsed.is_ok(), "{parsed:?}");
    assert!(qemu_img::parse_chain(CHAIN_JSON).is_ok());
    for version in [2, 3] {
        let image = chain::read_image(&FileBytes::of(&qcow2_seed(version)), None);
        let backing = Some((b"../images/base.qcow2".to_vec(), Some("qcow2".to_string())));
        assert_eq!(image.map(|i| i.backing), Ok(backing), "version {version}");
    }
}
