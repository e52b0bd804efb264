//! File writes that never leave a partial file behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A file's bytes: mapped from disk, or owned (a download, or a browser
/// where there is no file system). Model loaders read either.
pub enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// Write `bytes` to `path` so that readers see the old file or the new one,
/// never a part: write a temp file in the same folder, fsync it, rename it
/// over `path`, then fsync the folder (Unix). The temp file is removed on
/// failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let io_err = |source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half])?;
        pause_point("write-partial");
        f.write_all(&bytes[half..])?;
        f.sync_all()?;
        drop(f);
        pause_point("write-before-rename");
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    // Make the rename itself durable. Opening a folder fails on Windows,
    // where there is nothing to do.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    pause_point("write-after-rename");
    Ok(())
}

/// Whether `name` is a temp file name of [`write_atomic`].
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Fault injection for the tests: with `WGTUNE_PAUSE_AT=NAME:K` the K-th
/// pass (1-based) through the point NAME prints `wgtune: paused at NAME:K`
/// to stderr and sleeps forever, so that a test can SIGKILL the process at
/// exactly that moment; `NAME:K:SECS` sleeps SECS seconds and goes on (a
/// test can signal the process meanwhile). Without the variable this is
/// one read of a cell.
pub fn pause_point(name: &str) {
    use std::sync::atomic::AtomicUsize;
    use std::sync::OnceLock;
    static TARGET: OnceLock<Option<(String, usize, Option<u64>)>> = OnceLock::new();
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var("WGTUNE_PAUSE_AT").ok()?;
        let mut parts = v.split(':');
        let n = parts.next()?.to_string();
        let k = parts.next()?.parse().ok()?;
        let secs = parts.next().and_then(|s| s.parse().ok());
        Some((n, k, secs))
    });
    let Some((n, k, secs)) = target else { return };
    if n != name {
        return;
    }
    let hit = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if hit == *k {
        eprintln!("wgtune: paused at {name}:{k}");
        match secs {
            Some(s) => std::thread::sleep(std::time::Duration::from_secs(*s)),
            None => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
        }
    }
}

/// `safetensors::serialize` with the header's keys sorted. The crate takes
/// metadata as a `HashMap`, whose order changes from process to process, so
/// two runs with two or more metadata keys would write different bytes.
pub fn serialize_safetensors<'a, V: safetensors::View + 'a>(
    tensors: impl IntoIterator<Item = (String, V)>,
    metadata: std::collections::BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let meta: std::collections::HashMap<String, String> = metadata.into_iter().collect();
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(|e| e.to_string())?;
    // Layout: u64 header length, JSON header (space-padded to 8), data.
    let n = u64::from_le_bytes(
        bytes[..8]
            .try_into()
            .expect("invariant: serialize writes an 8-byte length first"),
    ) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| e.to_string())?;
    // serde_json's map is ordered by key (no preserve_order feature).
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}
