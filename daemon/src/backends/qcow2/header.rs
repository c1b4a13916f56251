//! The backing file name field of a qcow2 header, bounded and checked; the chain reader
//! (`chain.rs`) reads the rest, `overlay.rs` writes new headers.

use std::io;

pub(super) const MAGIC: &[u8; 4] = b"QFI\xfb";
/// The qcow2 specification's limit on the backing file name.
pub(super) const MAX_BACKING_NAME: u32 = 1023;
/// The header extension that holds the backing file's format.
pub(super) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// The backing file name from a header's first 20 bytes (`read` fetches the name's bytes).
pub(super) fn parse_backing(
    header: &[u8; 20],
    read: impl FnOnce(u64, usize) -> io::Result<Vec<u8>>,
) -> io::Result<Option<Vec<u8>>> {
    let version = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let offset = u64::from_be_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let size = u32::from_be_bytes([header[16], header[17], header[18], header[19]]);
    if !(2..=3).contains(&version) || offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > MAX_BACKING_NAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a backing file name of {size} bytes"),
        ));
    }
    // Both bounded just above: a usize holds them.
    read(offset, size as usize).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::qcow2::testing::qemu_img;
    use std::path::Path;

    #[test]
    fn reads_the_backing_file_as_qemu_img_wrote_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let relative = dir.path().join("relative.qcow2");
        let raw = dir.path().join("plain.raw");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            base.to_str().expect("utf-8"),
            "1M",
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            base.to_str().expect("utf-8"),
            top.to_str().expect("utf-8"),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            relative.to_str().expect("utf-8"),
            "1M",
        ]);
        std::fs::write(&raw, vec![0u8; 4096]).expect("write");
        let backing_of = |p: &Path| super::super::chain::backing_of(p.to_str().expect("utf-8"));
        let base = base.to_str().expect("utf-8").to_string();
        assert_eq!(backing_of(Path::new(&base)), None);
        assert_eq!(backing_of(&top), Some(base.clone()));
        assert_eq!(backing_of(&relative), Some(base));
        assert_eq!(backing_of(&raw), None);
        std::fs::write(&raw, b"QFI").expect("write");
        assert_eq!(backing_of(&raw), None, "too short to be qcow2");
    }

    #[test]
    fn odd_headers_are_refused_or_ignored_never_trusted() {
        let mut header = [0u8; 20];
        header[..4].copy_from_slice(MAGIC);
        header[7] = 3;
        header[15] = 0x40; // offset 64
        header[16..20].copy_from_slice(&5000u32.to_be_bytes());
        assert!(parse_backing(&header, |_, _| Ok(vec![])).is_err());
        header[16..20].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(parse_backing(&header, |_, _| Ok(vec![])).expect("ok"), None);
        header[7] = 9;
        header[16..20].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(
            parse_backing(&header, |_, _| Ok(b"base".to_vec())).expect("ok"),
            None
        );
    }
}
