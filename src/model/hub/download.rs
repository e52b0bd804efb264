//! A small client of the Hugging Face hub's file API (the `hub` feature):
//! the file list of a repo, then each file into the hub cache, laid out as
//! huggingface_hub lays it out, so that Python and wgtune share the cache:
//! `blobs/<etag>`, `snapshots/<commit>/<file>` (a relative link to the
//! blob), `refs/main`, and locks in `.locks/models--ORG--NAME/<etag>.lock`.
//!
//! A file is fetched into `blobs/<etag>.incomplete` and renamed to its blob
//! only once it holds exactly the bytes the server announced, so a broken
//! transfer is resumed (an HTTP Range request) by the next attempt, in this
//! run or a later one, and is never taken for a complete file.
//!
//! Environment, as huggingface_hub reads it: `HF_ENDPOINT` (default
//! `https://huggingface.co`), `HF_TOKEN` (else the file `HF_HOME/token`),
//! `HF_HUB_ETAG_TIMEOUT` (connect and metadata, default 10 s) and
//! `HF_HUB_DOWNLOAD_TIMEOUT` (each read of a file's body, default 10 s).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Attempts per file body; a dropped connection resumes where it broke.
const ATTEMPTS: u32 = 3;
/// Redirect hops followed per request.
const MAX_HOPS: usize = 5;

/// Files wgtune reads besides the weights, fetched when the repo has them.
/// config.json comes last: a snapshot with config.json is then complete.
const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Why a request failed, and whether trying again may help.
enum Fail {
    Retry(String),
    Fatal(String),
}

impl Fail {
    fn message(self) -> String {
        match self {
            Fail::Retry(m) | Fail::Fatal(m) => m,
        }
    }
}

/// What the hub says about one file before its body is fetched.
struct FileMeta {
    etag: String,
    size: u64,
    /// Where the body is (a CDN for large files).
    url: String,
}

struct Hub {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

fn env_secs(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

/// `HF_ENDPOINT` without a trailing slash, else the public hub.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

fn token() -> Option<String> {
    let from_env = std::env::var("HF_TOKEN").ok();
    let from_file = || {
        let home = std::env::var_os("HF_HOME")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                crate::model::import::home_dir()
                    .join(".cache")
                    .join("huggingface")
            });
        std::fs::read_to_string(home.join("token")).ok()
    };
    from_env
        .or_else(from_file)
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// A name that is safe as one path component (an etag or commit hash).
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// A file name of the repo that stays inside the snapshot folder.
fn safe_file(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.contains('\\')
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// `location` (absolute, or relative to `base`) as an absolute URL.
fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    if location.starts_with('/') {
        format!("{}{location}", &base[..host_end])
    } else {
        let dir = base
            .rfind('/')
            .filter(|&i| i >= host_end)
            .unwrap_or(host_end);
        format!("{}/{location}", &base[..dir])
    }
}

impl Hub {
    fn new() -> Self {
        let meta = env_secs("HF_HUB_ETAG_TIMEOUT", 10.0);
        let read = env_secs("HF_HUB_DOWNLOAD_TIMEOUT", 10.0);
        let agent = ureq::AgentBuilder::new()
            // Redirects are followed by hand: the hub's answer carries the
            // metadata, and the token must not travel to another host.
            .redirects(0)
            .timeout_connect(meta)
            .timeout_read(read)
            .timeout_write(read)
            .try_proxy_from_env(true)
            .user_agent(concat!("wgtune/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub {
            agent,
            endpoint: endpoint(),
            token: token(),
        }
    }

    /// One request, no redirects followed; a status of 400 or more is an error.
    fn call(&self, method: &str, url: &str, from: u64) -> Result<ureq::Response, Fail> {
        // The byte count must be the file's, so no transparent gzip.
        let mut req = self
            .agent
            .request(method, url)
            .set("Accept-Encoding", "identity");
        if let Some(t) = self
            .token
            .as_ref()
            .filter(|_| url.starts_with(&self.endpoint))
        {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if from > 0 {
            req = req.set("Range", &format!("bytes={from}-"));
        }
        req.call().map_err(|e| match e {
            ureq::Error::Status(code, resp) => {
                let hub_says = resp
                    .header("x-error-message")
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default();
                let what = format!("{method} {url}: HTTP {code}{hub_says}");
                match code {
                    401 | 403 => Fail::Fatal(format!(
                        "{what}\n---> HINT: the repo is private, gated or misspelled; for a \
                         gated or private repo accept its terms on the hub and set HF_TOKEN"
                    )),
                    404 => Fail::Fatal(what),
                    408 | 429 | 500..=599 => Fail::Retry(what),
                    _ => Fail::Fatal(what),
                }
            }
            // ureq names the URL itself.
            ureq::Error::Transport(t) => Fail::Retry(format!("{method} {t}")),
        })
    }

    /// The commit of `main` and the repo's file names.
    fn list(&self, repo: &str) -> Result<(String, Vec<String>), String> {
        let url = format!("{}/api/models/{repo}/revision/main", self.endpoint);
        let resp = self.call("GET", &url, 0).map_err(|f| match f {
            Fail::Fatal(m) if m.contains("HTTP 404") => {
                format!("no such repo on {} ({m})", self.endpoint)
            }
            f => f.message(),
        })?;
        let v: serde_json::Value = serde_json::from_reader(resp.into_reader())
            .map_err(|e| format!("{url}: not the hub's JSON: {e}"))?;
        let sha = v["sha"].as_str().unwrap_or_default().to_string();
        if !plain_name(&sha) {
            return Err(format!("{url}: the answer has no usable commit `sha`"));
        }
        let names = v["siblings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["rfilename"].as_str().map(String::from))
                    .collect()
            })
            .ok_or_else(|| format!("{url}: the answer has no `siblings` file list"))?;
        Ok((sha, names))
    }

    /// HEAD of `file`: its etag and size, as huggingface_hub reads them
    /// (relative redirects are renamed repos and are followed; an absolute
    /// one points to the body, and its own headers describe the file).
    fn head(&self, repo: &str, commit: &str, file: &str) -> Result<FileMeta, Fail> {
        let mut url = format!("{}/{repo}/resolve/{commit}/{file}", self.endpoint);
        for _ in 0..MAX_HOPS {
            let resp = self.call("HEAD", &url, 0)?;
            let redirect = (300..400).contains(&resp.status());
            let location = resp.header("location").map(String::from);
            if let (true, Some(loc)) = (redirect, &location) {
                if !loc.contains("://") {
                    url = join_url(&url, loc);
                    continue;
                }
            }
            let etag = resp
                .header("x-linked-etag")
                .or_else(|| resp.header("etag"))
                .unwrap_or_default()
                .trim_start_matches("W/")
                .replace('"', "");
            let size = resp
                .header("x-linked-size")
                .or_else(|| resp.header("content-length"))
                .and_then(|s| s.trim().parse::<u64>().ok());
            if !plain_name(&etag) {
                return Err(Fail::Fatal(format!(
                    "{url}: no usable ETag header ({etag:?})"
                )));
            }
            let Some(size) = size else {
                return Err(Fail::Fatal(format!("{url}: no file size in the headers")));
            };
            let body_url = match (redirect, location) {
                (true, Some(loc)) => join_url(&url, &loc),
                _ => url,
            };
            return Ok(FileMeta {
                etag,
                size,
                url: body_url,
            });
        }
        Err(Fail::Fatal(format!(
            "{url}: more than {MAX_HOPS} redirects"
        )))
    }

    /// GET the body from byte `from` on, following redirects.
    fn get(&self, url: &str, from: u64) -> Result<ureq::Response, Fail> {
        let mut url = url.to_string();
        for _ in 0..MAX_HOPS {
            let resp = self.call("GET", &url, from)?;
            if !(300..400).contains(&resp.status()) {
                return Ok(resp);
            }
            let loc = resp
                .header("location")
                .ok_or_else(|| Fail::Fatal(format!("{url}: a redirect without Location")))?;
            url = join_url(&url, loc);
        }
        Err(Fail::Fatal(format!(
            "{url}: more than {MAX_HOPS} redirects"
        )))
    }

    /// Append the body to `part` (from its current length on) until it
    /// holds `meta.size` bytes.
    fn fetch_into(&self, meta: &FileMeta, part: &Path, label: &str) -> Result<(), Fail> {
        let io = |e: std::io::Error| Fail::Fatal(format!("{}: {e}", part.display()));
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have > meta.size {
            have = 0;
        }
        if have == meta.size {
            return Ok(());
        }
        let resp = self.get(&meta.url, have)?;
        let mut file = match resp.status() {
            206 => {
                let start = resp
                    .header("content-range")
                    .and_then(|r| r.strip_prefix("bytes "))
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if start != Some(have) {
                    return Err(Fail::Fatal(format!(
                        "{}: asked for bytes {have}- but got Content-Range {:?}",
                        meta.url,
                        resp.header("content-range")
                    )));
                }
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(part)
                    .map_err(io)?
            }
            // The server ignored the Range: start over.
            200 => {
                have = 0;
                std::fs::File::create(part).map_err(io)?
            }
            s => {
                return Err(Fail::Fatal(format!(
                    "{}: unexpected HTTP {s} for the file body",
                    meta.url
                )))
            }
        };
        let bar = indicatif::ProgressBar::new(meta.size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(label.to_string());
        bar.set_position(have);
        // One byte past the announced size tells an overlong body apart.
        let mut body = resp.into_reader().take(meta.size - have + 1);
        let mut buf = vec![0u8; 1 << 16];
        let result = loop {
            match body.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if have + n as u64 > meta.size {
                        let _ = file.set_len(0);
                        break Err(Fail::Fatal(format!(
                            "{}: the body is longer than the {} bytes announced",
                            meta.url, meta.size
                        )));
                    }
                    file.write_all(&buf[..n]).map_err(io)?;
                    have += n as u64;
                    bar.set_position(have);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(Fail::Retry(format!("{}: {e}", meta.url))),
            }
        };
        bar.finish_and_clear();
        file.sync_all().map_err(io)?;
        result?;
        if have != meta.size {
            return Err(Fail::Retry(format!(
                "{}: the connection closed after {have} of {} bytes",
                meta.url, meta.size
            )));
        }
        Ok(())
    }
}

/// The cache folder of one repo, `models--ORG--NAME`.
pub fn repo_folder(hub_cache: &Path, repo: &str) -> PathBuf {
    hub_cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// Link `snapshots/<commit>/<file>` to `blobs/<etag>`, atomically.
fn link_snapshot(folder: &Path, commit: &str, file: &str, etag: &str) -> std::io::Result<()> {
    let pointer = folder.join("snapshots").join(commit).join(file);
    let parent = pointer
        .parent()
        .expect("invariant: a snapshot file has a parent folder");
    std::fs::create_dir_all(parent)?;
    let blob = folder.join("blobs").join(etag);
    if std::fs::canonicalize(&pointer).ok() == std::fs::canonicalize(&blob).ok() && pointer.exists()
    {
        return Ok(());
    }
    let tmp = parent.join(format!(".{etag}.link-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    {
        // snapshots/<commit>/<dirs of file...>/name -> ../../<dirs as ..>/blobs/<etag>
        let up = "../".repeat(2 + file.matches('/').count());
        std::os::unix::fs::symlink(format!("{up}blobs/{etag}"), &tmp)?;
    }
    #[cfg(not(unix))]
    std::fs::copy(&blob, &tmp)?;
    std::fs::rename(&tmp, &pointer)
}

/// An exclusive lock on `file`, the flock Python's filelock takes on Unix
/// (`File::lock` needs Rust 1.89, above the crate's MSRV).
#[cfg(unix)]
fn flock(file: &std::fs::File, wait: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let op = libc::LOCK_EX | if wait { 0 } else { libc::LOCK_NB };
    // SAFETY: flock takes a descriptor this File owns and no memory.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn flock(_file: &std::fs::File, _wait: bool) -> std::io::Result<()> {
    Ok(())
}

/// One file into the cache: its blob (unless there), then its snapshot link.
fn fetch_file(
    hub: &Hub,
    hub_cache: &Path,
    repo: &str,
    commit: &str,
    file: &str,
) -> Result<(), String> {
    let label = format!("{repo}/{file}");
    let ctx = |m: String| format!("{label}: {m}");
    let meta = hub.head(repo, commit, file).map_err(|f| ctx(f.message()))?;
    let folder = repo_folder(hub_cache, repo);
    let blobs = folder.join("blobs");
    let blob = blobs.join(&meta.etag);
    let io = |p: &Path, e: std::io::Error| ctx(format!("{}: {e}", p.display()));
    if std::fs::metadata(&blob).ok().map(|m| m.len()) != Some(meta.size) {
        std::fs::create_dir_all(&blobs).map_err(|e| io(&blobs, e))?;
        let locks = hub_cache.join(".locks").join(
            folder
                .file_name()
                .expect("invariant: a repo folder has a name"),
        );
        std::fs::create_dir_all(&locks).map_err(|e| io(&locks, e))?;
        let lock_path = locks.join(format!("{}.lock", meta.etag));
        let lock = std::fs::File::create(&lock_path).map_err(|e| io(&lock_path, e))?;
        if flock(&lock, false).is_err() {
            eprintln!("{label}: waiting for another download of it to finish");
            flock(&lock, true).map_err(|e| io(&lock_path, e))?;
        }
        // Another process may have finished it meanwhile.
        if std::fs::metadata(&blob).ok().map(|m| m.len()) != Some(meta.size) {
            let part = blobs.join(format!("{}.incomplete", meta.etag));
            eprintln!("downloading {label} ({} bytes)", meta.size);
            let mut attempt = 1;
            loop {
                match hub.fetch_into(&meta, &part, &label) {
                    Ok(()) => break,
                    Err(Fail::Retry(m)) if attempt < ATTEMPTS => {
                        log::warn!("{label}: {m}; resuming (attempt {})", attempt + 1);
                        std::thread::sleep(Duration::from_millis(250 << attempt));
                        attempt += 1;
                    }
                    Err(f) => {
                        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                        return Err(ctx(format!(
                            "{} (after {attempt} attempt(s); {have} of {} bytes kept in {}, \
                             which the next run resumes)",
                            f.message(),
                            meta.size,
                            part.display()
                        )));
                    }
                }
            }
            std::fs::rename(&part, &blob).map_err(|e| io(&blob, e))?;
        }
        drop(lock);
    }
    link_snapshot(&folder, commit, file, &meta.etag).map_err(|e| io(&folder, e))
}

/// Download the files wgtune reads of `repo` (at `main`) into `hub_cache`;
/// returns the snapshot folder.
pub fn download(repo: &str, hub_cache: &Path) -> Result<PathBuf, String> {
    let hub = Hub::new();
    let (commit, names) = hub.list(repo)?;
    let has = |n: &str| names.iter().any(|x| x == n);
    if !has("config.json") {
        return Err(format!(
            "the repo has no config.json (files: {}); for a GGUF repo, download the .gguf and \
             pass its path",
            names.join(", ")
        ));
    }
    let fetch = |f: &str| fetch_file(&hub, hub_cache, repo, &commit, f);
    for f in SIDE_FILES.iter().filter(|f| has(f)) {
        fetch(f)?;
    }
    let folder = repo_folder(hub_cache, repo);
    let snapshot = folder.join("snapshots").join(&commit);
    if has("model.safetensors") {
        fetch("model.safetensors")?;
    } else if has("model.safetensors.index.json") {
        fetch("model.safetensors.index.json")?;
        for shard in super::index_shards(&snapshot.join("model.safetensors.index.json"))? {
            if !safe_file(&shard) || !has(&shard) {
                return Err(format!(
                    "model.safetensors.index.json names the shard `{shard}`, which the repo \
                     does not list"
                ));
            }
            fetch(&shard)?;
        }
    } else {
        return Err("the repo has no model.safetensors (wgtune does not read .bin)".into());
    }
    fetch("config.json")?;
    let refs = folder.join("refs");
    std::fs::create_dir_all(&refs).map_err(|e| format!("{}: {e}", refs.display()))?;
    crate::fsio::write_atomic(&refs.join("main"), commit.as_bytes()).map_err(|e| e.to_string())?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_join_like_a_browser() {
        let base = "http://127.0.0.1:9/org/m/resolve/abc/config.json";
        assert_eq!(join_url(base, "https://cdn/x"), "https://cdn/x");
        assert_eq!(
            join_url(base, "/api/resolve-cache/x"),
            "http://127.0.0.1:9/api/resolve-cache/x"
        );
        assert_eq!(
            join_url(base, "other.json"),
            "http://127.0.0.1:9/org/m/resolve/abc/other.json"
        );
    }

    #[test]
    fn names_from_the_server_stay_inside_the_cache() {
        assert!(plain_name("0123abcdef"));
        assert!(!plain_name("../x"));
        assert!(!plain_name(""));
        assert!(safe_file("model-00001-of-00002.safetensors"));
        assert!(safe_file("sub/dir.json"));
        assert!(!safe_file("../model.safetensors"));
        assert!(!safe_file("/etc/passwd"));
        assert!(!safe_file("a//b"));
    }
}
