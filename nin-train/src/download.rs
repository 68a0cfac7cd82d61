//! Fetching the four Fashion-MNIST files from their official address.
//!
//! [`crate::data`] reads the data set from disk and refuses damaged files;
//! this module is how the files get onto a disk that has no
//! `dataset-fashion-mnist` package. [`download`] fetches the gzipped files
//! from [`FASHION_MNIST_BASE_URL`] (the address given in the
//! zalandoresearch/fashion-mnist README) into [`LOCAL_DATA_DIR`], which is
//! one of the places [`crate::data::find_data_dir`] searches.
//!
//! What a user can count on:
//!
//! - a file already there with the published MD5 checksum is not fetched
//!   again, so running the command twice costs nothing;
//! - bytes arrive in `<name>.part`; an interrupted download resumes from
//!   where it stopped with an HTTP `Range` request (a server that ignores it
//!   and sends the whole file is handled by starting over);
//! - a file only takes its final name once its checksum is right, and then
//!   atomically (fsync, rename, fsync of the directory), so a crash never
//!   leaves a half-written file under a name that [`crate::data`] would read;
//! - a checksum mismatch deletes the download and tries once more from
//!   scratch before failing with both checksums;
//! - connection errors, timeouts and 5xx answers are retried with
//!   exponential backoff; a 404 or another 4xx fails at once, naming the URL.
//!
//! The official address is plain `http://` (the S3 website endpoint serves
//! no TLS), so the HTTP client is built without TLS by default; integrity
//! comes from the published MD5 checksums, which no tampering can meet by
//! accident or design short of an MD5 second preimage. The crate feature
//! `https` adds rustls for mirrors that need it.
//!
//! The Debian package's `/usr/share/datasets/fashion-mnist/*.gz` do NOT
//! match these checksums although they hold the same data: Debian's build
//! rewrote their gzip headers (dropped the file name, reset the time stamp).
//! Copied into the cache they are therefore fetched again.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use md5::{Digest, Md5};

use crate::data::{Split, LOCAL_DATA_DIR};

/// Where Fashion-MNIST's authors publish the gzipped IDX files (see the
/// zalandoresearch/fashion-mnist README); the default of
/// [`DownloadOptions::base_url`].
pub const FASHION_MNIST_BASE_URL: &str =
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";

/// Suffix of a download in progress; only a verified file loses it.
pub const PART_SUFFIX: &str = ".part";

/// The published MD5 checksums of the four `.gz` files, by file stem (the
/// stems come from [`Split`] so the names cannot drift from what
/// [`crate::data`] looks for).
const FASHION_MNIST_MD5: [(&str, &str); 4] = [
    (
        Split::Train.images_stem(),
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    (
        Split::Train.labels_stem(),
        "25c81989df183df01b3e8a0aad5dffbe",
    ),
    (
        Split::Test.images_stem(),
        "bef4ecab320f06d8554ea6380940ec79",
    ),
    (
        Split::Test.labels_stem(),
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
];

/// Size of the read buffer, and so of the steps reported as progress.
const BUF_SIZE: usize = 64 * 1024;

/// Longest wait between two attempts, however many failed before.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Sent as `User-Agent`, so a server log says who fetched the files.
const USER_AGENT: &str = concat!("nin-train/", env!("CARGO_PKG_VERSION"));

/// One file to fetch: its name (both on the server, under the base URL, and
/// in the cache directory) and the MD5 checksum it must have.
///
/// A list of these, rather than a fixed table, lets tests serve small fake
/// files and lets a user point at a mirror of another IDX data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Plain file name such as `train-images-idx3-ubyte.gz`; no directories.
    pub name: String,
    /// Expected MD5 of the file's bytes, 32 hexadecimal digits (any case).
    pub md5: String,
}

impl RemoteFile {
    /// A file named `name` that must have the MD5 checksum `md5`.
    pub fn new(name: impl Into<String>, md5: impl Into<String>) -> Self {
        RemoteFile {
            name: name.into(),
            md5: md5.into(),
        }
    }

    /// The four gzipped Fashion-MNIST files with their published checksums,
    /// training set first; the default of [`DownloadOptions::files`].
    pub fn fashion_mnist() -> Vec<RemoteFile> {
        FASHION_MNIST_MD5
            .iter()
            .map(|(stem, md5)| RemoteFile::new(format!("{stem}.gz"), *md5))
            .collect()
    }
}

/// What to fetch, from where, to where, and how patiently.
///
/// [`Default`] fetches Fashion-MNIST from its official address into
/// `data/fashion-mnist` with timeouts and retries suited to a real network;
/// every field is public so the CLI and the tests can change just one.
#[derive(Clone, Debug)]
pub struct DownloadOptions {
    /// URL the file names are appended to (a trailing `/` is optional).
    /// `http://` always works; `https://` needs the crate feature `https`.
    pub base_url: String,
    /// Cache directory the files end up in; created if missing.
    pub dir: PathBuf,
    /// The files to fetch, in order; [`download`] returns their paths in the
    /// same order.
    pub files: Vec<RemoteFile>,
    /// How many times one file is requested before a transient failure
    /// (connection error, timeout, 5xx) is final; at least 1.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubled after each further one
    /// (capped at a minute). Tests set it to a millisecond.
    pub backoff: Duration,
    /// Limit on resolving the host name and on opening the connection.
    pub connect_timeout: Duration,
    /// Limit on each read from the connection (headers and body), so a
    /// stalled transfer fails (and is retried) instead of hanging forever,
    /// while a slow but moving one is never cut off.
    pub read_timeout: Duration,
    /// Honour `http_proxy`/`HTTPS_PROXY`/`ALL_PROXY` and `NO_PROXY` from the
    /// environment, as users behind a proxy expect. Tests turn it off so a
    /// developer's proxy never sees their loopback requests.
    pub proxy_from_env: bool,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            base_url: FASHION_MNIST_BASE_URL.to_owned(),
            dir: PathBuf::from(LOCAL_DATA_DIR),
            files: RemoteFile::fashion_mnist(),
            max_attempts: 5,
            backoff: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            proxy_from_env: true,
        }
    }
}

/// What [`download`] is doing, reported through its callback so the CLI can
/// drive a progress bar (and the library never prints).
///
/// For each file, in order, exactly one of two things happens: [`Cached`],
/// or one or more attempts, each starting with [`Started`] followed by
/// [`Received`] steps, ending with [`Finished`] (or an error from
/// [`download`]). [`Retrying`] and [`Discarded`] come between attempts.
///
/// [`Cached`]: Progress::Cached
/// [`Started`]: Progress::Started
/// [`Received`]: Progress::Received
/// [`Finished`]: Progress::Finished
/// [`Retrying`]: Progress::Retrying
/// [`Discarded`]: Progress::Discarded
#[derive(Clone, Copy, Debug)]
pub enum Progress<'a> {
    /// The file is already in the cache with the right checksum; nothing is
    /// requested.
    Cached {
        /// The file.
        file: &'a RemoteFile,
        /// Where it is.
        path: &'a Path,
    },
    /// The server answered and the body is about to be read.
    Started {
        /// The file.
        file: &'a RemoteFile,
        /// Bytes already in the `.part` file that are kept (non-zero when
        /// resuming); a bar starts here.
        offset: u64,
        /// Full size of the file, if the server said.
        total: Option<u64>,
    },
    /// More bytes arrived.
    Received {
        /// The file.
        file: &'a RemoteFile,
        /// Bytes of the file on disk so far, `offset` included.
        done: u64,
        /// Full size of the file, if the server said.
        total: Option<u64>,
    },
    /// An attempt failed in a way that may pass; the next one (which resumes
    /// from what is on disk) starts after `delay`.
    Retrying {
        /// The file.
        file: &'a RemoteFile,
        /// Number of the attempt that failed, from 1.
        attempt: u32,
        /// [`DownloadOptions::max_attempts`].
        max_attempts: u32,
        /// Wait before the next attempt.
        delay: Duration,
        /// What went wrong.
        error: &'a DownloadError,
    },
    /// The complete download had the wrong checksum and was deleted; it is
    /// fetched once more from scratch.
    Discarded {
        /// The file.
        file: &'a RemoteFile,
        /// The [`DownloadError::Checksum`] describing the mismatch.
        error: &'a DownloadError,
    },
    /// The file is verified and in place under its final name.
    Finished {
        /// The file.
        file: &'a RemoteFile,
        /// Where it is.
        path: &'a Path,
    },
}

/// Why [`download`] failed.
///
/// Messages name the URL or the file and the cause, because the reader is
/// setting up a machine and needs to know whether to retry later, fix an
/// address, or free disk space.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The options cannot work (bad URL scheme, file name or checksum);
    /// reported before anything is requested.
    #[error("cannot download: {0}")]
    Invalid(String),

    /// The server answered with an error status. A 4xx is final at once;
    /// a 5xx is retried first (and then wrapped in [`GaveUp`](Self::GaveUp)).
    #[error("{url}: the server answered HTTP {status}{}", status_hint(*.status))]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
    },

    /// No answer: the connection failed, broke off or timed out.
    #[error("cannot download {url}")]
    Transport {
        /// The URL requested.
        url: String,
        /// What the connection reported.
        #[source]
        source: io::Error,
    },

    /// The server answered, but not with what was asked for (a range
    /// starting elsewhere, a body shorter than announced).
    #[error("{url}: {reason}")]
    Protocol {
        /// The URL requested.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },

    /// Every attempt failed; `source` is the last failure.
    #[error("gave up on {url} after {attempts} attempts")]
    GaveUp {
        /// The URL requested.
        url: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: Box<DownloadError>,
    },

    /// The complete download does not have the published checksum, twice in
    /// a row; it has been deleted.
    #[error("checksum mismatch for {name} downloaded from {url}: expected MD5 {expected}, got {actual}; the download was deleted (the server may hold a different or damaged file)")]
    Checksum {
        /// The file's name.
        name: String,
        /// The URL it came from.
        url: String,
        /// The published checksum.
        expected: String,
        /// The checksum of what arrived.
        actual: String,
    },

    /// A local file or directory could not be created, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system reported.
        #[source]
        source: io::Error,
    },
}

/// Fetches every file of `options.files` that is not already in
/// `options.dir` with the right checksum, verifies it, and returns the paths
/// of all of them, in order.
///
/// Files are fetched one after another; the first failure stops the run
/// (files completed before it stay in place, a partial one stays as
/// `.part` to be resumed next time). `progress` is called from the calling
/// thread for every event, see [`Progress`].
///
/// # Errors
///
/// [`DownloadError::Invalid`] before any request if the options cannot
/// work; [`DownloadError::Status`] at once for a 4xx; [`DownloadError::GaveUp`]
/// once transient failures have used up [`DownloadOptions::max_attempts`];
/// [`DownloadError::Checksum`] if a file arrives wrong twice;
/// [`DownloadError::Io`] if the cache directory cannot be written.
pub fn download(
    options: &DownloadOptions,
    progress: &dyn Fn(Progress<'_>),
) -> Result<Vec<PathBuf>, DownloadError> {
    let base = check_options(options)?;
    fs::create_dir_all(&options.dir).map_err(|source| DownloadError::Io {
        path: options.dir.clone(),
        source,
    })?;
    let agent = agent(options);
    options
        .files
        .iter()
        .map(|file| fetch_file(&agent, options, base, file, progress))
        .collect()
}

/// The lowercase hexadecimal MD5 of `bytes`, as published for the files.
pub fn md5_hex(bytes: &[u8]) -> String {
    hex(&Md5::digest(bytes))
}

/// Refuses options that cannot work before anything is requested, and
/// returns the base URL without its trailing slashes.
fn check_options(options: &DownloadOptions) -> Result<&str, DownloadError> {
    let base = options.base_url.trim_end_matches('/');
    let scheme = base
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http") => {}
        Some("https") if cfg!(feature = "https") => {}
        Some("https") => {
            return Err(DownloadError::Invalid(format!(
                "{} is https://, which needs nin-train built with its `https` feature; \
                 the official Fashion-MNIST address {FASHION_MNIST_BASE_URL} is plain http",
                options.base_url
            )))
        }
        _ => {
            return Err(DownloadError::Invalid(format!(
                "base URL {:?} must start with http:// or https://",
                options.base_url
            )))
        }
    }
    if options.max_attempts == 0 {
        return Err(DownloadError::Invalid(
            "max_attempts must be at least 1".into(),
        ));
    }
    for file in &options.files {
        let name = &file.name;
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains(['/', '\\'])
            || name.chars().any(char::is_control)
        {
            return Err(DownloadError::Invalid(format!(
                "{name:?} is not a plain file name"
            )));
        }
        if file.md5.len() != 32 || !file.md5.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(DownloadError::Invalid(format!(
                "MD5 checksum {:?} of {name} is not 32 hexadecimal digits",
                file.md5
            )));
        }
    }
    Ok(base)
}

/// The HTTP client: error statuses as responses (we classify them), the
/// timeouts, raw bytes (`Accept-Encoding: identity`, so a server never
/// compresses what `Range` offsets count).
fn agent(options: &DownloadOptions) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_resolve(Some(options.connect_timeout))
        .timeout_connect(Some(options.connect_timeout))
        .timeout_per_read(Some(options.read_timeout))
        .user_agent(USER_AGENT)
        .accept_encoding("identity");
    if !options.proxy_from_env {
        config = config.proxy(None);
    }
    config.build().new_agent()
}

/// One file: skip it if cached, else fetch (with retries), verify, and move
/// into place; one full retry after a checksum mismatch.
fn fetch_file(
    agent: &ureq::Agent,
    options: &DownloadOptions,
    base: &str,
    file: &RemoteFile,
    progress: &dyn Fn(Progress<'_>),
) -> Result<PathBuf, DownloadError> {
    let dest = options.dir.join(&file.name);
    let url = format!("{base}/{}", file.name);
    if dest.is_file() {
        let actual = md5_file(&dest)?;
        if actual.eq_ignore_ascii_case(&file.md5) {
            tracing::debug!(path = %dest.display(), "already downloaded and verified");
            progress(Progress::Cached { file, path: &dest });
            return Ok(dest);
        }
        tracing::warn!(
            path = %dest.display(),
            expected = %file.md5,
            %actual,
            "cached file has the wrong checksum; downloading it again"
        );
    }
    let part = options.dir.join(format!("{}{PART_SUFFIX}", file.name));
    let mut discarded = false;
    loop {
        let actual = fetch_with_retries(agent, options, file, &url, &part, progress)?;
        if actual.eq_ignore_ascii_case(&file.md5) {
            nin_model::weights::rename_durably(&part, &dest).map_err(|source| {
                DownloadError::Io {
                    path: dest.clone(),
                    source,
                }
            })?;
            tracing::info!(path = %dest.display(), "downloaded and verified");
            progress(Progress::Finished { file, path: &dest });
            return Ok(dest);
        }
        remove_if_exists(&part)?;
        let error = DownloadError::Checksum {
            name: file.name.clone(),
            url: url.clone(),
            expected: file.md5.to_ascii_lowercase(),
            actual,
        };
        if discarded {
            return Err(error);
        }
        tracing::warn!("{error}; downloading it again from scratch");
        progress(Progress::Discarded {
            file,
            error: &error,
        });
        discarded = true;
    }
}

/// How one attempt failed: worth another try, or not.
enum Failure {
    /// Connection trouble, a timeout, a 5xx, a confused range answer.
    Retry(DownloadError),
    /// A 4xx, a local disk problem, an unusable URL.
    Fatal(DownloadError),
}

/// Attempts until one completes (returning the MD5 of the `.part` file),
/// a failure is fatal, or `max_attempts` are spent, sleeping with
/// exponential backoff in between.
fn fetch_with_retries(
    agent: &ureq::Agent,
    options: &DownloadOptions,
    file: &RemoteFile,
    url: &str,
    part: &Path,
    progress: &dyn Fn(Progress<'_>),
) -> Result<String, DownloadError> {
    let mut attempt = 1;
    loop {
        let error = match fetch_attempt(agent, url, file, part, progress) {
            Ok(md5) => return Ok(md5),
            Err(Failure::Fatal(error)) => return Err(error),
            Err(Failure::Retry(error)) => error,
        };
        if attempt >= options.max_attempts {
            return Err(DownloadError::GaveUp {
                url: url.to_owned(),
                attempts: attempt,
                source: Box::new(error),
            });
        }
        let delay = backoff(options.backoff, attempt);
        tracing::warn!(
            "attempt {attempt} of {} failed: {error}; retrying in {delay:?}",
            options.max_attempts
        );
        progress(Progress::Retrying {
            file,
            attempt,
            max_attempts: options.max_attempts,
            delay,
            error: &error,
        });
        thread::sleep(delay);
        attempt += 1;
    }
}

/// Wait after failed attempt number `attempt` (from 1): `base`, doubled for
/// each further attempt, at most [`MAX_BACKOFF`] (or `base` if larger).
fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(MAX_BACKOFF.max(base))
}

/// One request: resume the `.part` file if there is one, append the body,
/// fsync, and return the MD5 of the whole `.part` file.
fn fetch_attempt(
    agent: &ureq::Agent,
    url: &str,
    file: &RemoteFile,
    part: &Path,
    progress: &dyn Fn(Progress<'_>),
) -> Result<String, Failure> {
    let disk = |source| {
        Failure::Fatal(DownloadError::Io {
            path: part.to_path_buf(),
            source,
        })
    };
    let protocol = |reason: String| {
        Failure::Retry(DownloadError::Protocol {
            url: url.to_owned(),
            reason,
        })
    };
    let mut offset = match fs::metadata(part) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(disk(e)),
    };

    let mut request = agent.get(url);
    if offset > 0 {
        tracing::info!(%url, offset, "resuming download");
        request = request.header("Range", format!("bytes={offset}-"));
    } else {
        tracing::info!(%url, "downloading");
    }
    let response = request.call().map_err(|e| transport(url, e))?;
    let status = response.status().as_u16();
    let content_length = response.body().content_length();
    let content_range = response
        .headers()
        .get("content-range")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);

    let resuming = offset > 0;
    if !matches!((status, resuming), (200, _) | (206 | 416, true)) {
        let error = DownloadError::Status {
            url: url.to_owned(),
            status,
        };
        return Err(if is_transient_status(status) {
            Failure::Retry(error)
        } else {
            Failure::Fatal(error)
        });
    }

    // Only now, with an answer worth keeping, touch the disk.
    let mut out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)
        .map_err(disk)?;
    let mut hasher = Md5::new();
    let total = match status {
        200 => {
            if offset > 0 {
                tracing::info!(%url, "server ignored the Range request; starting over");
                offset = 0;
            }
            out.set_len(0).map_err(disk)?;
            content_length
        }
        206 => {
            let range = content_range.as_deref().and_then(parse_content_range);
            match range {
                Some(ContentRange {
                    first: Some((first, last)),
                    total,
                }) if first == offset => {
                    offset = hash_prefix(&mut out, offset, &mut hasher).map_err(disk)?;
                    total.or(Some(last + 1))
                }
                _ => {
                    out.set_len(0).map_err(disk)?;
                    return Err(protocol(format!(
                        "asked for bytes from {offset} on, got Content-Range {:?}; \
                         starting over",
                        content_range.unwrap_or_default()
                    )));
                }
            }
        }
        416 => {
            let total = content_range
                .as_deref()
                .and_then(parse_content_range)
                .and_then(|range| range.total);
            if total.is_some_and(|total| total != offset) {
                out.set_len(0).map_err(disk)?;
                return Err(protocol(format!(
                    "{} holds {offset} bytes but the file has {}; starting over",
                    part.display(),
                    total.unwrap_or_default()
                )));
            }
            // The previous run got every byte but stopped before verifying.
            hash_prefix(&mut out, offset, &mut hasher).map_err(disk)?;
            out.sync_all().map_err(disk)?;
            return Ok(hex(&hasher.finalize()));
        }
        _ => unreachable!("status {status} was answered above"),
    };

    out.seek(SeekFrom::Start(offset)).map_err(disk)?;
    progress(Progress::Started {
        file,
        offset,
        total,
    });
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0; BUF_SIZE];
    let mut done = offset;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                // What arrived stays in the .part file for the next attempt.
                return Err(Failure::Retry(DownloadError::Transport {
                    url: url.to_owned(),
                    source,
                }));
            }
        };
        out.write_all(&buf[..n]).map_err(disk)?;
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(Progress::Received { file, done, total });
    }
    if let Some(total) = total {
        if done < total {
            return Err(protocol(format!(
                "the connection ended after {done} of {total} bytes"
            )));
        }
    }
    out.sync_all().map_err(disk)?;
    Ok(hex(&hasher.finalize()))
}

/// Feeds the first `len` bytes of `file` (the kept part of a download) to
/// `hasher`, leaving the file position after them; returns how many there
/// were, which is less than `len` only if the file shrank meanwhile.
fn hash_prefix(file: &mut File, len: u64, hasher: &mut Md5) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let read = hash_reader(&mut file.take(len), hasher)?;
    file.set_len(read)?;
    Ok(read)
}

/// Feeds everything `reader` yields to `hasher`; returns the byte count.
fn hash_reader(reader: &mut impl Read, hasher: &mut Md5) -> io::Result<u64> {
    let mut buf = vec![0; BUF_SIZE];
    let mut count = 0;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(count),
            Ok(n) => {
                hasher.update(&buf[..n]);
                count += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The hexadecimal MD5 of the file at `path`.
fn md5_file(path: &Path) -> Result<String, DownloadError> {
    let io_error = |source| DownloadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let mut hasher = Md5::new();
    hash_reader(&mut file, &mut hasher).map_err(io_error)?;
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hexadecimal digits of `bytes`.
fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Classifies a failed request: connection trouble and timeouts may pass,
/// anything else (a malformed URL, TLS required) will not.
fn transport(url: &str, error: ureq::Error) -> Failure {
    let retry = matches!(
        error,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
    );
    let error = DownloadError::Transport {
        url: url.to_owned(),
        source: error.into_io(),
    };
    if retry {
        Failure::Retry(error)
    } else {
        Failure::Fatal(error)
    }
}

/// Statuses that say "try again later": server errors, request timeout,
/// too many requests.
fn is_transient_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// The usual reason phrase and advice after a status code, for messages.
fn status_hint(status: u16) -> &'static str {
    match status {
        400 => " (Bad Request)",
        401 | 403 => " (Forbidden): the server refuses this file; check the base URL",
        404 | 410 => " (Not Found): no such file at this address; check the base URL",
        408 => " (Request Timeout)",
        416 => " (Range Not Satisfiable)",
        429 => " (Too Many Requests): try again later",
        500..=599 => " (server error): try again later",
        _ => "",
    }
}

/// A parsed `Content-Range` header: `bytes first-last/total`, where either
/// side may be `*`.
#[derive(Debug, PartialEq, Eq)]
struct ContentRange {
    /// First and last byte sent, inclusive.
    first: Option<(u64, u64)>,
    /// Full size of the file.
    total: Option<u64>,
}

/// Parses `bytes 100-199/200`, `bytes 100-199/*` or `bytes */200`.
fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        total => Some(total.parse().ok()?),
    };
    let first = match range.trim() {
        "*" => None,
        range => {
            let (first, last) = range.split_once('-')?;
            let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
            if last < first {
                return None;
            }
            Some((first, last))
        }
    };
    Some(ContentRange { first, total })
}

/// Deletes `path`; a file that is already gone is fine.
fn remove_if_exists(path: &Path) -> Result<(), DownloadError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DownloadError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::net::TcpListener;
    use std::sync::{mpsc, Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::Instant;

    use tiny_http::{Header, Response, ResponseBox, StatusCode};

    /// One request as the test server saw it.
    #[derive(Clone, Debug)]
    struct Hit {
        /// Path without the leading `/`: the file name.
        name: String,
        /// The `Range` header, if sent.
        range: Option<String>,
    }

    /// A loopback HTTP server answering with `handler(hit, n)`, where `n`
    /// counts earlier requests for the same file; it records every request.
    struct TestServer {
        base_url: String,
        hits: Arc<Mutex<Vec<Hit>>>,
        server: Arc<tiny_http::Server>,
        thread: Option<JoinHandle<()>>,
    }

    impl TestServer {
        fn start(handler: impl Fn(&Hit, usize) -> ResponseBox + Send + 'static) -> Self {
            let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
            let port = server.server_addr().to_ip().unwrap().port();
            let hits = Arc::new(Mutex::new(Vec::<Hit>::new()));
            let thread = {
                let server = Arc::clone(&server);
                let hits = Arc::clone(&hits);
                thread::spawn(move || {
                    for request in server.incoming_requests() {
                        let hit = Hit {
                            name: request.url().trim_start_matches('/').to_owned(),
                            range: request
                                .headers()
                                .iter()
                                .find(|h| h.field.equiv("Range"))
                                .map(|h| h.value.as_str().to_owned()),
                        };
                        let n = {
                            let mut hits = hits.lock().unwrap();
                            let n = hits.iter().filter(|h| h.name == hit.name).count();
                            hits.push(hit.clone());
                            n
                        };
                        let _ = request.respond(handler(&hit, n));
                    }
                })
            };
            TestServer {
                base_url: format!("http://127.0.0.1:{port}/"),
                hits,
                server,
                thread: Some(thread),
            }
        }

        /// Requests made for `name`, in order.
        fn hits(&self, name: &str) -> Vec<Hit> {
            let hits = self.hits.lock().unwrap();
            hits.iter().filter(|h| h.name == name).cloned().collect()
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.server.unblock();
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn header(name: &str, value: &str) -> Header {
        Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap()
    }

    /// A response with a `Content-Length` of `length` (like S3's), whatever
    /// the size of `body`.
    fn reply(status: u16, headers: Vec<Header>, body: &[u8], length: usize) -> ResponseBox {
        Response::new(
            StatusCode(status),
            headers,
            Cursor::new(body.to_vec()),
            Some(length),
            None,
        )
        .with_chunked_threshold(usize::MAX)
        .boxed()
    }

    /// The whole file, 200, ignoring any `Range`.
    fn whole(data: &[u8]) -> ResponseBox {
        reply(200, vec![], data, data.len())
    }

    /// An error status with a short text body.
    fn status(code: u16) -> ResponseBox {
        let body = format!("HTTP {code}");
        reply(code, vec![], body.as_bytes(), body.len())
    }

    /// What a server that supports ranges sends for `hit`.
    fn ranged(data: &[u8], hit: &Hit) -> ResponseBox {
        let start = hit
            .range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse::<usize>().ok());
        match start {
            None => whole(data),
            Some(start) if start >= data.len() => {
                let range = format!("bytes */{}", data.len());
                reply(416, vec![header("Content-Range", &range)], b"", 0)
            }
            Some(start) => {
                let range = format!("bytes {start}-{}/{}", data.len() - 1, data.len());
                let body = &data[start..];
                reply(206, vec![header("Content-Range", &range)], body, body.len())
            }
        }
    }

    /// Deterministic bytes that look nothing like their neighbours.
    fn fake(len: usize, seed: u8) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).rotate_right(13) as u8) ^ seed)
            .collect()
    }

    /// Small stand-ins for the four files, under their real names.
    fn fake_files() -> Vec<(String, Vec<u8>)> {
        RemoteFile::fashion_mnist()
            .into_iter()
            .zip([(150_000, 1), (6_000, 2), (40_000, 3), (1_000, 4)])
            .map(|(file, (len, seed))| (file.name, fake(len, seed)))
            .collect()
    }

    /// Serves `files` (honouring `Range`), 404 for anything else.
    fn serve(files: Vec<(String, Vec<u8>)>) -> impl Fn(&Hit, usize) -> ResponseBox + Send {
        move |hit, _| match files.iter().find(|(name, _)| *name == hit.name) {
            Some((_, data)) => ranged(data, hit),
            None => status(404),
        }
    }

    fn options(server: &TestServer, dir: &Path, files: &[(String, Vec<u8>)]) -> DownloadOptions {
        DownloadOptions {
            base_url: server.base_url.clone(),
            dir: dir.to_path_buf(),
            files: files
                .iter()
                .map(|(name, data)| RemoteFile::new(name.clone(), md5_hex(data)))
                .collect(),
            max_attempts: 3,
            backoff: Duration::from_millis(1),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            proxy_from_env: false,
        }
    }

    /// Progress events, flattened to strings for easy assertions.
    #[derive(Default)]
    struct Events(Mutex<Vec<String>>);

    impl Events {
        fn record(&self, event: Progress<'_>) {
            let line = match event {
                Progress::Cached { file, .. } => format!("cached {}", file.name),
                Progress::Started {
                    file,
                    offset,
                    total,
                } => format!("started {} {offset} {total:?}", file.name),
                Progress::Received { file, done, total } => {
                    if Some(done) == total {
                        format!("received {} {done}", file.name)
                    } else {
                        return;
                    }
                }
                Progress::Retrying { file, attempt, .. } => {
                    format!("retrying {} {attempt}", file.name)
                }
                Progress::Discarded { file, .. } => format!("discarded {}", file.name),
                Progress::Finished { file, .. } => format!("finished {}", file.name),
            };
            self.0.lock().unwrap().push(line);
        }

        fn take(&self) -> Vec<String> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn run(options: &DownloadOptions, events: &Events) -> Result<Vec<PathBuf>, DownloadError> {
        download(options, &|event| events.record(event))
    }

    fn part_of(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}{PART_SUFFIX}"))
    }

    #[test]
    fn fashion_mnist_table_matches_the_data_module_and_the_readme() {
        let files = RemoteFile::fashion_mnist();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "train-images-idx3-ubyte.gz",
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
            ]
        );
        for split in Split::ALL {
            for stem in [split.images_stem(), split.labels_stem()] {
                assert!(names.contains(&format!("{stem}.gz").as_str()), "{stem}");
            }
        }
        assert_eq!(files[0].md5, "8d4fb7e6c68d591d4c3dfef9ec88bf0d");
        assert_eq!(files[3].md5, "bb300cfdad3c16e7a12a480ee83cd310");
        let defaults = DownloadOptions::default();
        assert_eq!(defaults.base_url, FASHION_MNIST_BASE_URL);
        assert_eq!(defaults.dir, Path::new(LOCAL_DATA_DIR));
        assert_eq!(defaults.files, files);
        check_options(&defaults).unwrap();
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn downloads_and_verifies_every_file() {
        let files = fake_files();
        let server = TestServer::start(serve(files.clone()));
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("nested/cache");
        let events = Events::default();
        let paths = run(&options(&server, &cache, &files), &events).unwrap();

        let expected: Vec<_> = files.iter().map(|(name, _)| cache.join(name)).collect();
        assert_eq!(paths, expected);
        let mut log = Vec::new();
        for (name, data) in &files {
            assert_eq!(fs::read(cache.join(name)).unwrap(), *data, "{name}");
            assert!(!part_of(&cache, name).exists(), "{name}.part left behind");
            let hits = server.hits(name);
            assert_eq!(hits.len(), 1, "{name}: {hits:?}");
            assert_eq!(hits[0].range, None);
            log.extend([
                format!("started {name} 0 Some({})", data.len()),
                format!("received {name} {}", data.len()),
                format!("finished {name}"),
            ]);
        }
        assert_eq!(events.take(), log);
    }

    #[test]
    fn corrupt_file_fails_with_checksum_error_and_leaves_nothing() {
        let files = fake_files();
        let (name, good) = files[1].clone();
        let mut bad = good.clone();
        bad[100] ^= 0xff;
        let served = vec![(name.clone(), bad.clone())];
        let server = TestServer::start(serve(served));
        let dir = tempfile::tempdir().unwrap();
        let events = Events::default();
        let error = run(&options(&server, dir.path(), &files[1..2]), &events).unwrap_err();

        match &error {
            DownloadError::Checksum {
                name: n,
                expected,
                actual,
                ..
            } => {
                assert_eq!(n, &name);
                assert_eq!(expected, &md5_hex(&good));
                assert_eq!(actual, &md5_hex(&bad));
            }
            other => panic!("expected a checksum error, got {other:?}"),
        }
        let message = error.to_string();
        for needle in [name.as_str(), &md5_hex(&good), &md5_hex(&bad)] {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        assert!(!dir.path().join(&name).exists());
        assert!(!part_of(dir.path(), &name).exists());
        // One full retry from scratch, then the error.
        let hits = server.hits(&name);
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert!(hits.iter().all(|h| h.range.is_none()), "{hits:?}");
        let log = events.take();
        assert_eq!(
            log.iter().filter(|l| l.starts_with("discarded")).count(),
            1,
            "{log:?}"
        );
    }

    #[test]
    fn not_found_is_an_immediate_error_naming_the_url() {
        let server = TestServer::start(|_, _| status(404));
        let dir = tempfile::tempdir().unwrap();
        let files = fake_files();
        let error = run(&options(&server, dir.path(), &files), &Events::default()).unwrap_err();

        let name = &files[0].0;
        let url = format!("{}{name}", server.base_url);
        match &error {
            DownloadError::Status { url: u, status } => {
                assert_eq!(u, &url);
                assert_eq!(*status, 404);
            }
            other => panic!("expected a status error, got {other:?}"),
        }
        let message = error.to_string();
        assert!(message.contains(&url), "{message}");
        assert!(message.contains("404"), "{message}");
        // No retry, nothing else requested, nothing left on disk.
        assert_eq!(server.hits.lock().unwrap().len(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn present_good_file_is_not_requested_again() {
        let files = fake_files();
        let server = TestServer::start(serve(files.clone()));
        let dir = tempfile::tempdir().unwrap();
        let (name, data) = &files[0];
        fs::write(dir.path().join(name), data).unwrap();
        let events = Events::default();
        let paths = run(&options(&server, dir.path(), &files), &events).unwrap();

        assert_eq!(paths.len(), files.len());
        assert!(server.hits(name).is_empty());
        for (other, _) in &files[1..] {
            assert_eq!(server.hits(other).len(), 1, "{other}");
        }
        assert_eq!(events.take()[0], format!("cached {name}"));

        // A second run requests nothing at all.
        let before = server.hits.lock().unwrap().len();
        run(&options(&server, dir.path(), &files), &events).unwrap();
        assert_eq!(server.hits.lock().unwrap().len(), before);
        assert!(events.take().iter().all(|l| l.starts_with("cached")));
    }

    #[test]
    fn damaged_present_file_is_downloaded_again() {
        let files = fake_files();
        let server = TestServer::start(serve(files.clone()));
        let dir = tempfile::tempdir().unwrap();
        let (name, data) = &files[3];
        fs::write(dir.path().join(name), &data[..data.len() / 2]).unwrap();
        run(
            &options(&server, dir.path(), &files[3..]),
            &Events::default(),
        )
        .unwrap();

        assert_eq!(fs::read(dir.path().join(name)).unwrap(), *data);
        assert_eq!(server.hits(name).len(), 1);
    }

    #[test]
    fn interrupted_download_resumes_with_a_range_request() {
        let files = fake_files();
        let server = TestServer::start(serve(files.clone()));
        let dir = tempfile::tempdir().unwrap();
        let (name, data) = &files[0];
        let half = data.len() / 2;
        fs::write(part_of(dir.path(), name), &data[..half]).unwrap();
        let events = Events::default();
        run(&options(&server, dir.path(), &files[..1]), &events).unwrap();

        assert_eq!(fs::read(dir.path().join(name)).unwrap(), *data);
        assert!(!part_of(dir.path(), name).exists());
        let hits = server.hits(name);
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert_eq!(hits[0].range.as_deref(), Some(&*format!("bytes={half}-")));
        assert_eq!(
            events.take(),
            [
                format!("started {name} {half} Some({})", data.len()),
                format!("received {name} {}", data.len()),
                format!("finished {name}"),
            ]
        );
    }

    #[test]
    fn server_ignoring_range_restarts_from_zero() {
        let files = fake_files();
        let data = files[0].1.clone();
        let server = TestServer::start(move |_, _| whole(&data));
        let dir = tempfile::tempdir().unwrap();
        let (name, data) = &files[0];
        let half = data.len() / 2;
        fs::write(part_of(dir.path(), name), &data[..half]).unwrap();
        let events = Events::default();
        run(&options(&server, dir.path(), &files[..1]), &events).unwrap();

        assert_eq!(fs::read(dir.path().join(name)).unwrap(), *data);
        let hits = server.hits(name);
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert_eq!(hits[0].range.as_deref(), Some(&*format!("bytes={half}-")));
        assert_eq!(
            events.take()[0],
            format!("started {name} 0 Some({})", data.len())
        );
    }

    #[test]
    fn complete_part_file_is_verified_without_a_body() {
        let files = fake_files();
        let server = TestServer::start(serve(files.clone()));
        let dir = tempfile::tempdir().unwrap();
        let (name, data) = &files[1];
        fs::write(part_of(dir.path(), name), data).unwrap();
        let events = Events::default();
        run(&options(&server, dir.path(), &files[1..2]), &events).unwrap();

        assert_eq!(fs::read(dir.path().join(name)).unwrap(), *data);
        assert!(!part_of(dir.path(), name).exists());
        assert_eq!(server.hits(name).len(), 1);
        assert_eq!(events.take(), [format!("finished {name}")]);
    }

    #[test]
    fn server_error_is_retried_then_succeeds() {
        let files = fake_files();
        let data = files[2].1.clone();
        let server = TestServer::start(move |hit, n| match n {
            0 => status(500),
            _ => ranged(&data, hit),
        });
        let dir = tempfile::tempdir().unwrap();
        let (name, data) = &files[2];
        let events = Events::default();
        run(&options(&server, dir.path(), &files[2..3]), &events).unwrap();

        assert_eq!(fs::read(dir.path().join(name)).unwrap(), *data);
        assert_eq!(server.hits(name).len(), 2);
        assert_eq!(
            events.take(),
            [
                format!("retrying {name} 1"),
                format!("started {name} 0 Some({})", data.len()),
                format!("received {name} {}", data.len()),
                format!("finished {name}"),
            ]
        );
    }

    #[test]
    fn persistent_server_error_gives_up_after_max_attempts() {
        let server = TestServer::start(|_, _| status(503));
        let dir = tempfile::tempdir().unwrap();
        let files = fake_files();
        let error = run(&options(&server, dir.path(), &files), &Events::default()).unwrap_err();

        match &error {
            DownloadError::GaveUp {
                attempts, source, ..
            } => {
                assert_eq!(*attempts, 3);
                assert!(
                    matches!(**source, DownloadError::Status { status: 503, .. }),
                    "{source:?}"
                );
            }
            other => panic!("expected GaveUp, got {other:?}"),
        }
        // What the CLI prints: the error and its causes.
        let chain: Vec<String> =
            std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source())
                .map(|e| e.to_string())
                .collect();
        let chain = chain.join(": ");
        assert!(
            chain.contains("503") && chain.contains("gave up"),
            "{chain}"
        );
        assert_eq!(server.hits(&files[0].0).len(), 3);
    }

    #[test]
    fn stalled_transfer_times_out_and_resumes() {
        let files = fake_files();
        let data = files[0].1.clone();
        let half = data.len() / 2;
        // First answer: promises the whole file, sends half, then goes
        // silent with the connection open.
        let server = TestServer::start(move |hit, n| match n {
            0 => reply(200, vec![], &data[..half], data.len()),
            _ => ranged(&data, hit),
        });
        let dir = tempfile::tempdir().unwrap();
        let (name, data) = &files[0];
        let mut options = options(&server, dir.path(), &files[..1]);
        options.read_timeout = Duration::from_millis(200);
        run(&options, &Events::default()).unwrap();

        assert_eq!(fs::read(dir.path().join(name)).unwrap(), *data);
        let hits = server.hits(name);
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert_eq!(hits[1].range.as_deref(), Some(&*format!("bytes={half}-")));
    }

    #[test]
    fn silent_server_times_out() {
        // Accepts connections and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}/", listener.local_addr().unwrap());
        let (stop, stopped) = mpsc::channel::<()>();
        thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..2 {
                held.push(listener.accept());
            }
            let _ = stopped.recv();
        });
        let dir = tempfile::tempdir().unwrap();
        let options = DownloadOptions {
            base_url,
            dir: dir.path().to_path_buf(),
            max_attempts: 2,
            backoff: Duration::from_millis(1),
            read_timeout: Duration::from_millis(100),
            proxy_from_env: false,
            ..DownloadOptions::default()
        };
        let start = Instant::now();
        let error = run(&options, &Events::default()).unwrap_err();
        drop(stop);

        assert!(start.elapsed() < Duration::from_secs(10));
        match &error {
            DownloadError::GaveUp {
                attempts: 2,
                source,
                ..
            } => assert!(
                matches!(**source, DownloadError::Transport { .. }),
                "{source:?}"
            ),
            other => panic!("expected GaveUp after a timeout, got {other:?}"),
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn invalid_options_are_refused_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let base = DownloadOptions {
            base_url: "http://127.0.0.1:9/".into(),
            dir: dir.path().join("never-created"),
            files: vec![RemoteFile::new("a.gz", md5_hex(b"a"))],
            ..DownloadOptions::default()
        };
        let cases = [
            DownloadOptions {
                base_url: "ftp://127.0.0.1/".into(),
                ..base.clone()
            },
            DownloadOptions {
                files: vec![RemoteFile::new("../a.gz", md5_hex(b"a"))],
                ..base.clone()
            },
            DownloadOptions {
                files: vec![RemoteFile::new("a.gz", "not-a-checksum")],
                ..base.clone()
            },
            DownloadOptions {
                max_attempts: 0,
                ..base.clone()
            },
        ];
        for options in &cases {
            let error = run(options, &Events::default()).unwrap_err();
            assert!(matches!(error, DownloadError::Invalid(_)), "{error:?}");
        }
        if !cfg!(feature = "https") {
            let options = DownloadOptions {
                base_url: "https://127.0.0.1/".into(),
                ..base.clone()
            };
            let error = run(&options, &Events::default()).unwrap_err();
            assert!(error.to_string().contains("`https` feature"), "{error}");
        }
        assert!(!base.dir.exists());
    }

    #[test]
    fn content_range_parsing_and_backoff() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some(ContentRange {
                first: Some((100, 199)),
                total: Some(200)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-9/*"),
            Some(ContentRange {
                first: Some((0, 9)),
                total: None
            })
        );
        assert_eq!(
            parse_content_range("bytes */200"),
            Some(ContentRange {
                first: None,
                total: Some(200)
            })
        );
        assert_eq!(parse_content_range("bytes 9-1/200"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);

        let base = Duration::from_millis(10);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 2), base * 2);
        assert_eq!(backoff(base, 4), base * 8);
        assert_eq!(backoff(base, 100), MAX_BACKOFF);
    }
}
