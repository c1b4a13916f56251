//! `snapshot export` and `snapshot import`: a snapshot's content record moved between hosts
//! that share its storage, as a file.

use std::io::{Read, Write};
use std::path::Path;

use crate::bus::Bus;

/// The largest record read: a definition and a few volumes are kilobytes.
const MAX_RECORD: u64 = 16 << 20;

pub async fn export(bus: &Bus, vm: &str, name: &str, file: Option<&Path>) -> Result<(), String> {
    let manager = bus.manager().await?;
    let record = manager
        .export_snapshot(vm, name)
        .await
        .map_err(|e| bus.describe_api(e))?;
    match file {
        None => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{record}")
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the record: {e}"))
        }
        Some(path) => write_new(path, &record),
    }
}

/// Writes `text` to a new file: complete or absent, never over an existing one.
fn write_new(path: &Path, text: &str) -> Result<(), String> {
    let shown = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut temp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("cannot write {shown}: {e}"))?;
    temp.write_all(text.as_bytes())
        .and_then(|()| temp.write_all(b"\n"))
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| format!("cannot write {shown}: {e}"))?;
    temp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            format!("{shown} already exists; name a new file")
        } else {
            format!("cannot write {shown}: {}", e.error)
        }
    })?;
    Ok(())
}

/// The exported record in `file` (`-`: standard input), at most `MAX_RECORD` bytes of UTF-8.
pub fn read_record(file: &str) -> Result<String, String> {
    let mut bytes = Vec::new();
    let read = if file == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_RECORD + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(MAX_RECORD + 1).read_to_end(&mut bytes))
    };
    let shown = if file == "-" { "standard input" } else { file };
    read.map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(format!("{shown} is larger than a snapshot record can be"));
    }
    String::from_utf8(bytes).map_err(|_| format!("{shown} is not text (UTF-8)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_never_replaces_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s1.json");
        write_new(&path, "{}").expect("writes");
        assert_eq!(std::fs::read_to_string(&path).expect("reads"), "{}\n");
        let again = write_new(&path, "{\"other\": 1}").expect_err("refused");
        assert!(again.contains("already exists"), "{again}");
        assert_eq!(std::fs::read_to_string(&path).expect("reads"), "{}\n");
        assert_eq!(std::fs::read_dir(dir.path()).expect("lists").count(), 1);
    }

    #[test]
    fn a_record_must_be_text_and_not_huge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = dir.path().join("b");
        std::fs::write(&binary, [0xff, 0xfe]).expect("writes");
        assert!(read_record(binary.to_str().expect("utf-8"))
            .expect_err("refused")
            .contains("not text"));
        assert!(read_record("/nonexistent/x").is_err());
    }
}
