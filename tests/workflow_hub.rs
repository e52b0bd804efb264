//! `--model ORG/NAME` against a Hugging Face hub served on the loopback
//! address (`HF_ENDPOINT`), with the cache in a temp folder (`HF_HUB_CACHE`):
//! a normal download that then works with the server gone, a connection
//! dropped in the middle of a file (resumed in the run, or failed cleanly and
//! resumed by the next run), a stalled transfer (timed out), and 404s. The
//! cache must never hold a partial file where a complete one belongs.
//!
//! The server is a small HTTP/1.1 loop on `127.0.0.1:0`, one connection at
//! a time, each closed after its answer. It serves the hub's routes that
//! wgtune calls: `/api/models/{repo}/revision/{rev}` (the file list),
//! `/{repo}/resolve/{rev}/{file}` (HEAD and GET, ETag, X-Repo-Commit,
//! Range), and for `.safetensors` the LFS way: a redirect to `/cdn/{file}`
//! with X-Linked-Etag and X-Linked-Size.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::cli::{root, Run};

const REPO: &str = "Org/Tiny";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// Files of the repo: what wgtune reads, and two it must not fetch.
const FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "reference.json",
    "kv_reference.safetensors",
];
const WANTED: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp_created("hub", name)
}

fn source(file: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/reference/data/tiny-llama").join(file)).unwrap()
}

/// The server's ETag of a file: FNV-1a of its bytes, with its length.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

/// What the server does wrong, and what it saw.
#[derive(Default)]
struct State {
    /// GETs of this file's body that send the full Content-Length, then
    /// only `cut` bytes, then close (`drops` of them) ...
    drop_file: Option<String>,
    drops: usize,
    cut: usize,
    /// ... or then keep the connection open without sending more.
    stall: bool,
    stalled: Vec<TcpStream>,
    /// Files the listing names but resolve answers 404 for.
    missing: Vec<String>,
    /// One line per request: `METHOD path` and ` from N` for a Range.
    log: Vec<String>,
}

struct Hub {
    url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hub {
    fn start() -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let files: BTreeMap<String, Vec<u8>> =
            FILES.iter().map(|f| (f.to_string(), source(f))).collect();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, u) = (state.clone(), stop.clone(), url.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, &u, &files, &st);
                }
            }
        });
        Hub {
            url,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// Stop accepting; later connections are refused.
    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loop so that it sees the flag.
            let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
            t.join().unwrap();
            self.state.lock().unwrap().stalled.clear();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn head_line(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    length: usize,
) -> std::io::Result<()> {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {length}\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    conn.write_all(h.as_bytes())
}

fn not_found(conn: &mut TcpStream, code: &str, message: &str) -> std::io::Result<()> {
    let body = format!("{{\"error\":\"{message}\"}}");
    let headers = [
        ("X-Error-Code", code.to_string()),
        ("X-Error-Message", message.to_string()),
    ];
    head_line(conn, "404 Not Found", &headers, body.len())?;
    conn.write_all(body.as_bytes())
}

/// Answer one request on `conn`, then close it.
fn serve(
    mut conn: TcpStream,
    url: &str,
    files: &BTreeMap<String, Vec<u8>>,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut from = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                from = v
                    .trim()
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|s| s.parse::<usize>().ok());
            }
        }
    }
    let range = from.map(|f| format!(" from {f}")).unwrap_or_default();
    state
        .lock()
        .unwrap()
        .log
        .push(format!("{method} {path}{range}"));
    let repo_file = |p: &str| -> Option<(String, String)> {
        // /{org}/{name}/resolve/{rev}/{file}
        let mut s = p.trim_start_matches('/').splitn(5, '/');
        let (org, name, resolve, _rev, file) =
            (s.next()?, s.next()?, s.next()?, s.next()?, s.next()?);
        (resolve == "resolve").then(|| (format!("{org}/{name}"), file.to_string()))
    };
    if let Some(repo) = path
        .strip_prefix("/api/models/")
        .and_then(|p| p.strip_suffix("/revision/main"))
    {
        if repo != REPO {
            return not_found(&mut conn, "RepoNotFound", "Repository not found");
        }
        let siblings: Vec<String> = files
            .keys()
            .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\":\"{REPO}\",\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        head_line(&mut conn, "200 OK", &[], body.len())?;
        return conn.write_all(body.as_bytes());
    }
    let (file, body_route) = if let Some(f) = path.strip_prefix("/cdn/") {
        (f.to_string(), true)
    } else if let Some((repo, f)) = repo_file(&path) {
        if repo != REPO {
            return not_found(&mut conn, "RepoNotFound", "Repository not found");
        }
        (f, false)
    } else {
        return not_found(&mut conn, "EntryNotFound", "no such route");
    };
    let Some(bytes) = files.get(&file) else {
        return not_found(&mut conn, "EntryNotFound", "Entry not found");
    };
    if state.lock().unwrap().missing.contains(&file) {
        return not_found(&mut conn, "EntryNotFound", "Entry not found");
    }
    let tag = etag(bytes);
    let commit = ("X-Repo-Commit", COMMIT.to_string());
    if !body_route && file.ends_with(".safetensors") {
        let headers = [
            commit,
            ("X-Linked-Etag", format!("\"{tag}\"")),
            ("X-Linked-Size", bytes.len().to_string()),
            ("ETag", "\"pointer-etag\"".to_string()),
            ("Location", format!("{url}/cdn/{file}")),
        ];
        return head_line(&mut conn, "302 Found", &headers, 0);
    }
    let start = from.filter(|&f| f < bytes.len()).unwrap_or(0);
    let body = &bytes[start..];
    let mut headers = vec![
        commit,
        ("ETag", format!("\"{tag}\"")),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    let status = if start > 0 {
        let end = bytes.len() - 1;
        headers.push((
            "Content-Range",
            format!("bytes {start}-{end}/{}", bytes.len()),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    head_line(&mut conn, status, &headers, body.len())?;
    if method == "HEAD" {
        return Ok(());
    }
    let mut st = state.lock().unwrap();
    if st.drop_file.as_deref() == Some(file.as_str()) && st.drops > 0 {
        st.drops -= 1;
        conn.write_all(&body[..st.cut.min(body.len())])?;
        conn.flush()?;
        if st.stall {
            // Hold the connection open; the client must time out.
            st.stalled.push(conn);
        }
        return Ok(());
    }
    drop(st);
    conn.write_all(body)
}

/// `wgtune args` with the hub at `url` and the cache in `dir/hub`:
/// (success, stdout, stderr).
fn wgtune(url: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let r = Run::from(
        common::cli::command(args, "warn")
            .env("HF_ENDPOINT", url)
            .env("HF_HUB_CACHE", dir.join("hub"))
            .env("HF_HOME", dir.join("home"))
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .envs(env.iter().copied())
            .output()
            .expect("run wgtune"),
    );
    assert!(
        !r.stderr.contains("panicked"),
        "wgtune panicked:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    (r.ok(), r.stdout, r.stderr)
}

/// `wgtune plan` reads config.json and the weights' headers, no GPU needed.
fn plan(url: &str, dir: &Path, repo: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let args = [
        "plan",
        "--model",
        repo,
        "--seq-len",
        "16",
        "--batch-size",
        "1",
    ];
    wgtune(url, dir, &args, env)
}

fn repo_dir(dir: &Path) -> PathBuf {
    dir.join("hub").join("models--Org--Tiny")
}

fn snapshot(dir: &Path) -> PathBuf {
    repo_dir(dir).join("snapshots").join(COMMIT)
}

/// Files in the repo's blobs folder whose name ends with `suffix`.
fn blobs_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(repo_dir(dir).join("blobs"))
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default()
}

/// The snapshot holds exactly the wanted files, byte for byte, as links
/// to blobs named by their ETag, and `refs/main` names the commit.
fn assert_cache_complete(dir: &Path) {
    let snap = snapshot(dir);
    for f in WANTED {
        let got = std::fs::read(snap.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(
            got == source(f),
            "{f}: the cached bytes differ from the served ones"
        );
        let blob = repo_dir(dir).join("blobs").join(etag(&got));
        assert_eq!(
            std::fs::canonicalize(snap.join(f)).unwrap(),
            std::fs::canonicalize(blob).unwrap(),
            "{f}"
        );
    }
    for f in ["reference.json", "kv_reference.safetensors"] {
        assert!(
            !snap.join(f).exists(),
            "{f} was fetched but wgtune does not read it"
        );
    }
    assert_eq!(
        std::fs::read_to_string(repo_dir(dir).join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(blobs_ending(dir, ".incomplete").is_empty());
}

#[test]
fn a_repo_downloads_generates_and_then_works_from_the_cache_with_the_server_gone() {
    let _ctx = gpu!();
    let dir = tmp("normal");
    let mut hub = Hub::start();
    let args = [
        "generate",
        "--model",
        REPO,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
    ];
    let (ok, out, err) = wgtune(&hub.url, &dir, &args, &[]);
    assert!(ok, "{out}\n{err}");
    // Progress goes to stderr; stdout holds what generate prints.
    assert!(
        err.contains("downloading Org/Tiny/model.safetensors"),
        "{err}"
    );
    assert!(!out.contains("downloading"), "{out}");
    assert_cache_complete(&dir);
    let log = hub.log();
    assert!(
        log.iter().all(|l| !l.contains("reference")),
        "fetched a file wgtune does not read: {log:?}"
    );
    assert!(
        log.contains(&"GET /cdn/model.safetensors".to_string()),
        "{log:?}"
    );

    hub.stop();
    let (ok2, out2, err2) = wgtune(&hub.url, &dir, &args, &[]);
    assert!(ok2, "from the cache, server gone:\n{out2}\n{err2}");
    assert!(!err2.contains("downloading"), "{err2}");
    assert_eq!(out2, out, "greedy generation differs between the two runs");
    let (ok3, out3, err3) = wgtune(&hub.url, &dir, &args, &[("HF_HUB_OFFLINE", "1")]);
    assert!(ok3, "HF_HUB_OFFLINE=1:\n{out3}\n{err3}");
}

#[test]
fn a_connection_dropped_in_the_middle_of_a_file_is_resumed_in_the_run() {
    let dir = tmp("drop-once");
    let hub = Hub::start();
    hub.set(|s| {
        s.drop_file = Some("model.safetensors".into());
        s.drops = 1;
        s.cut = 1000;
    });
    let (ok, out, err) = plan(&hub.url, &dir, REPO, &[]);
    assert!(ok, "{out}\n{err}");
    let log = hub.log();
    let gets: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with("GET /cdn/model.safetensors"))
        .collect();
    assert_eq!(
        gets,
        [
            "GET /cdn/model.safetensors",
            "GET /cdn/model.safetensors from 1000"
        ],
        "{log:?}"
    );
    assert_cache_complete(&dir);
}

#[test]
fn a_connection_that_keeps_dropping_fails_cleanly_and_the_next_run_resumes() {
    let dir = tmp("drop-always");
    let hub = Hub::start();
    hub.set(|s| {
        s.drop_file = Some("model.safetensors".into());
        s.drops = usize::MAX;
        s.cut = 1000;
    });
    let (ok, out, err) = plan(&hub.url, &dir, REPO, &[]);
    assert!(!ok, "a broken download succeeded:\n{out}\n{err}");
    assert!(
        err.contains("Org/Tiny/model.safetensors") && err.contains("which the next run resumes"),
        "{err}"
    );
    // Nothing that looks complete: no weights in the snapshot, no blob,
    // no config.json (fetched last), no refs/main.
    let weights = source("model.safetensors");
    let snap = snapshot(&dir);
    assert!(!snap.join("model.safetensors").exists());
    assert!(!snap.join("config.json").exists());
    assert!(!repo_dir(&dir).join("blobs").join(etag(&weights)).exists());
    assert!(!repo_dir(&dir).join("refs/main").exists());
    let parts = blobs_ending(&dir, ".incomplete");
    assert_eq!(parts.len(), 1, "{parts:?}");
    let part = std::fs::read(&parts[0]).unwrap();
    assert!(
        !part.is_empty() && part.len() < weights.len(),
        "{}",
        part.len()
    );
    assert!(
        part == weights[..part.len()],
        "the kept part is not a prefix of the file"
    );

    // Offline, the partial download is not taken for the model.
    let (ok, out, err) = plan(&hub.url, &dir, REPO, &[("HF_HUB_OFFLINE", "1")]);
    assert!(!ok, "{out}\n{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");

    // A healthy server: the next run resumes from the kept bytes.
    hub.set(|s| s.drops = 0);
    let (ok, out, err) = plan(&hub.url, &dir, REPO, &[]);
    assert!(ok, "{out}\n{err}");
    let resumed = format!("GET /cdn/model.safetensors from {}", part.len());
    assert!(hub.log().contains(&resumed), "{:?}", hub.log());
    assert_cache_complete(&dir);
}

#[test]
fn a_stalled_transfer_times_out_and_leaves_no_file_taken_for_complete() {
    let dir = tmp("stall");
    let hub = Hub::start();
    hub.set(|s| {
        s.drop_file = Some("model.safetensors".into());
        s.drops = usize::MAX;
        s.cut = 500;
        s.stall = true;
    });
    let env = [("HF_HUB_DOWNLOAD_TIMEOUT", "0.5")];
    let (ok, out, err) = plan(&hub.url, &dir, REPO, &env);
    assert!(!ok, "{out}\n{err}");
    assert!(err.contains("Org/Tiny/model.safetensors"), "{err}");
    assert!(!snapshot(&dir).join("model.safetensors").exists());
    assert!(!snapshot(&dir).join("config.json").exists());
    hub.set(|s| {
        s.drops = 0;
        s.stalled.clear();
    });
    let (ok, out, err) = plan(&hub.url, &dir, REPO, &[]);
    assert!(ok, "{out}\n{err}");
    assert_cache_complete(&dir);
}

#[test]
fn an_unknown_repo_or_a_missing_file_is_a_clear_error_and_writes_nothing() {
    let dir = tmp("404");
    let hub = Hub::start();
    let (ok, out, err) = plan(&hub.url, &dir, "Org/Nope", &[]);
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("Org/Nope") && err.contains("404") && err.contains("no such repo"),
        "{err}"
    );
    assert!(!dir.join("hub").join("models--Org--Nope").exists());

    hub.set(|s| s.missing = vec!["model.safetensors".into()]);
    let (ok, out, err) = plan(&hub.url, &dir, REPO, &[]);
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("Org/Tiny/model.safetensors") && err.contains("404"),
        "{err}"
    );
    let weights = source("model.safetensors");
    assert!(!snapshot(&dir).join("model.safetensors").exists());
    assert!(!snapshot(&dir).join("config.json").exists());
    assert!(!repo_dir(&dir).join("blobs").join(etag(&weights)).exists());
    assert!(blobs_ending(&dir, ".incomplete").is_empty());
}
