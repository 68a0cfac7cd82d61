//! The Fashion-MNIST files: found, read and checked.
//!
//! Fashion-MNIST ships as four IDX files (a big-endian header, then one byte
//! per pixel or label), usually gzipped. This module turns them into raw
//! bytes and labels, and refuses anything that is not exactly what the
//! header promises: a wrong magic number, a body that is too short or too
//! long, a label that is not a class, images and labels that do not pair up.
//! A damaged download fails here, naming the file, instead of quietly
//! training on garbage.
//!
//! We do not use candle-datasets' `vision::mnist::load_dir`, because it reads
//! only un-gzipped files, returns f32 already divided by 255 (the shared
//! preprocessing in [`nin_model::preprocess`] starts from bytes), checks
//! neither sizes nor labels, and pulls in hf-hub and parquet.
//!
//! Where the files live is decided by [`find_data_dir`]: an explicit
//! directory, else `$NIN_DATA_DIR`, `./data/fashion-mnist`, and the Debian
//! package's `/usr/share/datasets/fashion-mnist`, in that order.

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

/// Number of Fashion-MNIST classes; [`load_split`] rejects any label at or
/// above it.
pub const NUM_CLASSES: usize = 10;

/// Environment variable naming the data directory; searched after an
/// explicit directory, before the built-in places.
pub const DATA_DIR_ENV: &str = "NIN_DATA_DIR";

/// Data directory relative to the working directory, for a checkout that
/// keeps its own copy; searched after `$NIN_DATA_DIR`.
pub const LOCAL_DATA_DIR: &str = "data/fashion-mnist";

/// Where the Debian/Ubuntu package `dataset-fashion-mnist` puts the files;
/// searched last.
pub const SYSTEM_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// How to get the data; every error about a missing file ends with it.
const HOW_TO_GET: &str =
    "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass --data-dir";

/// The same advice for a file that is there but damaged.
const GOOD_COPY: &str = "get a good copy of Fashion-MNIST: \
    install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass --data-dir";

/// IDX magic numbers: two zero bytes, the element type (0x08 = u8), the
/// number of dimensions.
const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The first two bytes of every gzip stream (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Largest image accepted, in pixels (4096x4096). Fashion-MNIST has 784; the
/// limit only stops a damaged header from describing absurd images.
const MAX_IMAGE_PIXELS: usize = 1 << 24;

/// Never reserve more than this up front: a damaged header may promise
/// gigabytes that the file does not hold.
const MAX_PREALLOC: usize = 64 << 20;

/// Everything that can go wrong while finding or reading the data set.
///
/// File errors name the file, say what is wrong with it, and say how to get
/// a good copy, because the person reading them is usually setting up a
/// machine, not debugging this module.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file that is needed does not exist (in any accepted form).
    #[error("Fashion-MNIST file {path} not found{}; {HOW_TO_GET}", also_tried_note(.also_tried))]
    Missing {
        path: PathBuf,
        /// The other name that was tried (`<stem>.gz`), if any.
        also_tried: Option<PathBuf>,
    },

    /// No directory in the search list holds the four files.
    #[error("Fashion-MNIST not found: no directory holds the needed files; searched {}; {HOW_TO_GET}", searched_list(.searched))]
    NotFound {
        /// Each directory searched, with what it lacks.
        searched: Vec<(PathBuf, String)>,
    },

    /// The file exists but could not be read, or its gzip stream is damaged.
    #[error(
        "cannot read Fashion-MNIST file {path}: {source}; the file may be damaged; {GOOD_COPY}"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The file does not start with the magic number of the expected IDX kind.
    #[error("{path} is not an IDX {kind} file: magic number {found:#010x}, expected {expected:#010x}; the file is damaged or not Fashion-MNIST; {GOOD_COPY}")]
    BadMagic {
        path: PathBuf,
        /// "images" or "labels".
        kind: &'static str,
        expected: u32,
        found: u32,
    },

    /// The header's dimensions are zero or absurd.
    #[error("{path} has a bad IDX header: {reason}; the file is damaged or not Fashion-MNIST; {GOOD_COPY}")]
    BadHeader { path: PathBuf, reason: String },

    /// The file ends before the data its header promises.
    #[error("{path} is truncated: it holds {found} bytes of IDX data, its header promises {expected}; {GOOD_COPY}")]
    Truncated {
        path: PathBuf,
        /// Bytes of IDX data (header included, after decompression).
        expected: u64,
        found: u64,
    },

    /// Bytes follow the data its header promises.
    #[error("{path} has trailing garbage: it holds {found} bytes of IDX data, its header promises exactly {expected}; the file is damaged; {GOOD_COPY}")]
    TrailingBytes {
        path: PathBuf,
        /// Bytes of IDX data (header included, after decompression).
        expected: u64,
        found: u64,
    },

    /// A label is not the index of a class.
    #[error("{path}: label {label} at index {index} is not a class (there are {num_classes}); the file is damaged or not Fashion-MNIST; {GOOD_COPY}")]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: u8,
        num_classes: usize,
    },

    /// The images and labels of a split do not pair up.
    #[error("{images} holds {image_count} images but {labels} holds {label_count} labels; the files do not belong together; {GOOD_COPY}")]
    CountMismatch {
        images: PathBuf,
        image_count: usize,
        labels: PathBuf,
        label_count: usize,
    },
}

/// " (nor <path>)" for a [`DataError::Missing`] that tried a second name.
fn also_tried_note(also_tried: &Option<PathBuf>) -> String {
    match also_tried {
        Some(path) => format!(" (nor {})", path.display()),
        None => String::new(),
    }
}

/// "dir (why), dir (why)" for [`DataError::NotFound`].
fn searched_list(searched: &[(PathBuf, String)]) -> String {
    searched
        .iter()
        .map(|(dir, why)| format!("{} ({why})", dir.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Shorthand for this module's results.
pub type Result<T> = std::result::Result<T, DataError>;

/// The two halves of Fashion-MNIST: 60,000 training and 10,000 test images.
///
/// Each is a pair of files whose names (the stems, without `.gz`) are fixed
/// by the original distribution, so a split is all it takes to find them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// `train-*`: 60,000 images to fit the model on.
    Train,
    /// `t10k-*`: 10,000 held-out images to measure it on.
    Test,
}

impl Split {
    /// Both splits, training first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];

    /// Name of the images file without `.gz`, as in the original distribution.
    pub const fn images_stem(self) -> &'static str {
        match self {
            Split::Train => "train-images-idx3-ubyte",
            Split::Test => "t10k-images-idx3-ubyte",
        }
    }

    /// Name of the labels file without `.gz`, as in the original distribution.
    pub const fn labels_stem(self) -> &'static str {
        match self {
            Split::Train => "train-labels-idx1-ubyte",
            Split::Test => "t10k-labels-idx1-ubyte",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// Images as stored in an IDX file: `count` images of `rows` x `cols`
/// bytes, row-major, one after the other.
///
/// Kept as bytes because the shared preprocessing in nin-model starts from
/// bytes; converting here would fix a recipe in two places.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    /// Number of images.
    pub count: usize,
    /// Height of every image in pixels (28 for Fashion-MNIST).
    pub rows: usize,
    /// Width of every image in pixels (28 for Fashion-MNIST).
    pub cols: usize,
    /// `count * rows * cols` bytes, 0 = background.
    pub pixels: Vec<u8>,
}

impl Images {
    /// Bytes per image (`rows * cols`).
    pub fn image_len(&self) -> usize {
        self.rows * self.cols
    }

    /// The pixels of image `i`, row-major. Panics if `i >= count`, like
    /// slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(i < self.count, "image {i} of {}", self.count);
        let len = self.image_len();
        &self.pixels[i * len..(i + 1) * len]
    }
}

/// One split: images and their labels, checked to pair up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// The images, in file order.
    pub images: Images,
    /// One class index per image, each below [`NUM_CLASSES`].
    pub labels: Vec<u8>,
}

impl Dataset {
    /// Number of (image, label) pairs.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the split holds nothing (never for a loaded split).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`; panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        self.images.image(i)
    }

    /// The label of image `i`; panics if `i >= len()`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// Images per class: entry `c` counts label `c`. At least
    /// [`NUM_CLASSES`] long, longer only if a label is out of range (which
    /// [`load_split`] never lets through).
    pub fn class_counts(&self) -> Vec<usize> {
        let classes = self
            .labels
            .iter()
            .map(|&label| usize::from(label) + 1)
            .max()
            .unwrap_or(0)
            .max(NUM_CLASSES);
        let mut counts = vec![0; classes];
        for &label in &self.labels {
            counts[usize::from(label)] += 1;
        }
        counts
    }
}

/// Reads an IDX images file (magic 2051), gzipped or not.
///
/// Gzip is recognised by its magic bytes, not by the name, so a renamed or
/// decompressed-in-place file still reads. Fails unless the dimensions are
/// non-zero and sane and the data is exactly `count * rows * cols` bytes.
pub fn read_idx_images(path: &Path) -> Result<Images> {
    let mut reader = open(path)?;
    let header = read_header(path, &mut reader, IMAGES_MAGIC, "images", 3)?;
    let (count, rows, cols) = (header[0], header[1], header[2]);
    let bad = |reason: String| DataError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    if count == 0 || rows == 0 || cols == 0 {
        return Err(bad(format!(
            "{count} images of {rows}x{cols}: every dimension must be non-zero"
        )));
    }
    let image_len = rows
        .checked_mul(cols)
        .filter(|&len| len <= MAX_IMAGE_PIXELS)
        .ok_or_else(|| {
            bad(format!(
                "{rows}x{cols} images are larger than the {MAX_IMAGE_PIXELS} pixels accepted"
            ))
        })?;
    let data_len = count.checked_mul(image_len).ok_or_else(|| {
        bad(format!(
            "{count} images of {rows}x{cols} do not fit in memory"
        ))
    })?;
    let pixels = read_body(path, &mut reader, header_len(3), data_len)?;
    tracing::debug!(path = %path.display(), count, rows, cols, "read IDX images");
    Ok(Images {
        count,
        rows,
        cols,
        pixels,
    })
}

/// Reads an IDX labels file (magic 2049), gzipped or not, and checks that
/// every label is below `num_classes` ([`NUM_CLASSES`] for Fashion-MNIST).
///
/// The class count is a parameter so that the reader does not bake in one
/// data set; a label out of range would otherwise surface much later as an
/// index error inside the loss.
pub fn read_idx_labels(path: &Path, num_classes: usize) -> Result<Vec<u8>> {
    let mut reader = open(path)?;
    let header = read_header(path, &mut reader, LABELS_MAGIC, "labels", 1)?;
    let count = header[0];
    if count == 0 {
        return Err(DataError::BadHeader {
            path: path.to_path_buf(),
            reason: "0 labels: the count must be non-zero".into(),
        });
    }
    let labels = read_body(path, &mut reader, header_len(1), count)?;
    if let Some(index) = labels
        .iter()
        .position(|&label| usize::from(label) >= num_classes)
    {
        return Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label: labels[index],
            num_classes,
        });
    }
    tracing::debug!(path = %path.display(), count, "read IDX labels");
    Ok(labels)
}

/// Loads one split from `dir`: `<stem>` or `<stem>.gz` for both files
/// (the plain file wins when both exist), checked to hold as many images as
/// labels, every label below [`NUM_CLASSES`].
pub fn load_split(dir: &Path, split: Split) -> Result<Dataset> {
    let images_path = locate(dir, split.images_stem())?;
    let labels_path = locate(dir, split.labels_stem())?;
    let images = read_idx_images(&images_path)?;
    let labels = read_idx_labels(&labels_path, NUM_CLASSES)?;
    if images.count != labels.len() {
        return Err(DataError::CountMismatch {
            images: images_path,
            image_count: images.count,
            labels: labels_path,
            label_count: labels.len(),
        });
    }
    tracing::info!(%split, dir = %dir.display(), images = images.count, "loaded Fashion-MNIST");
    Ok(Dataset { images, labels })
}

/// The directory to load Fashion-MNIST from.
///
/// An explicit directory (from `--data-dir`) is used as given and is an
/// error if it lacks any of the four files: the user asked for it, so
/// falling back elsewhere would hide a typo. Otherwise the first of
/// `$NIN_DATA_DIR`, `./data/fashion-mnist` and
/// `/usr/share/datasets/fashion-mnist` that holds all four files (each
/// plain or `.gz`) wins. Only existence is checked here; [`load_split`]
/// checks the contents.
pub fn find_data_dir(explicit: Option<&Path>, splits: &[Split]) -> Result<PathBuf> {
    let env = std::env::var_os(DATA_DIR_ENV);
    if explicit.is_none() {
        if let Some(dir) = env.as_deref().filter(|dir| !dir.is_empty()) {
            if let Some(why) = lacks(Path::new(dir), splits) {
                tracing::warn!(
                    "{DATA_DIR_ENV}={} is not usable ({why}); looking elsewhere",
                    Path::new(dir).display()
                );
            }
        }
    }
    search_data_dir(explicit, &candidate_dirs(env.as_deref()), splits)
}

/// The search list after an explicit directory, given the value of
/// `$NIN_DATA_DIR` (ignored when empty).
fn candidate_dirs(env_value: Option<&OsStr>) -> Vec<PathBuf> {
    env_value
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from(LOCAL_DATA_DIR),
            PathBuf::from(SYSTEM_DATA_DIR),
        ])
        .collect()
}

/// [`find_data_dir`] with the candidate list spelled out, for tests.
fn search_data_dir(
    explicit: Option<&Path>,
    candidates: &[PathBuf],
    splits: &[Split],
) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        for stem in stems(splits) {
            locate(dir, stem)?;
        }
        return Ok(dir.to_path_buf());
    }
    let mut searched = Vec::with_capacity(candidates.len());
    for dir in candidates {
        match lacks(dir, splits) {
            None => {
                tracing::debug!(dir = %dir.display(), "found Fashion-MNIST");
                return Ok(dir.clone());
            }
            Some(why) => searched.push((dir.clone(), why)),
        }
    }
    Err(DataError::NotFound { searched })
}

/// The file stems of `splits`.
fn stems(splits: &[Split]) -> impl Iterator<Item = &'static str> + '_ {
    splits
        .iter()
        .flat_map(|split| [split.images_stem(), split.labels_stem()])
}

/// What `dir` lacks to hold `splits`, or `None` if it has their files.
fn lacks(dir: &Path, splits: &[Split]) -> Option<String> {
    if !dir.is_dir() {
        return Some("no such directory".into());
    }
    stems(splits)
        .find(|stem| locate(dir, stem).is_err())
        .map(|stem| format!("no {stem}(.gz)"))
}

/// `dir/<stem>` if it is a file, else `dir/<stem>.gz`, else a
/// [`DataError::Missing`] naming both.
fn locate(dir: &Path, stem: &str) -> Result<PathBuf> {
    let plain = dir.join(stem);
    if plain.is_file() {
        return Ok(plain);
    }
    let gz = dir.join(format!("{stem}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    Err(DataError::Missing {
        path: plain,
        also_tried: Some(gz),
    })
}

/// Opens `path`, decompressing on the fly if it starts with the gzip magic.
fn open(path: &Path) -> Result<Box<dyn Read>> {
    let io_error = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
                also_tried: None,
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut reader = BufReader::new(File::open(path).map_err(io_error)?);
    let gzipped = reader
        .fill_buf()
        .map_err(io_error)?
        .starts_with(&GZIP_MAGIC);
    Ok(if gzipped {
        // Multi-member, like `gzip -d`: concatenated gzip files are one stream.
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

/// Bytes in an IDX header with `dims` dimensions: the magic, then one u32 each.
fn header_len(dims: usize) -> usize {
    4 + 4 * dims
}

/// Reads and checks the magic number, then returns the `dims` dimensions.
fn read_header(
    path: &Path,
    reader: &mut dyn Read,
    magic: u32,
    kind: &'static str,
    dims: usize,
) -> Result<Vec<usize>> {
    let mut header = vec![0u8; header_len(dims)];
    let got = read_full(reader, &mut header).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let words: Vec<u32> = header
        .chunks_exact(4)
        .map(|word| u32::from_be_bytes(word.try_into().expect("chunks of 4")))
        .collect();
    // A short file with the wrong magic is the wrong file, not a truncated one.
    if got >= 4 && words[0] != magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            kind,
            expected: magic,
            found: words[0],
        });
    }
    if got < header.len() {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header.len() as u64,
            found: got as u64,
        });
    }
    words[1..]
        .iter()
        .map(|&word| {
            usize::try_from(word).map_err(|_| DataError::BadHeader {
                path: path.to_path_buf(),
                reason: format!("dimension {word} does not fit in memory"),
            })
        })
        .collect()
}

/// Reads exactly `data_len` bytes after a header of `header_len` bytes and
/// checks that nothing follows them.
fn read_body(
    path: &Path,
    reader: &mut dyn Read,
    header_len: usize,
    data_len: usize,
) -> Result<Vec<u8>> {
    let io_error = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let expected = (header_len + data_len) as u64;
    // Grows as bytes arrive, so a header promising too much costs no memory.
    let mut data = Vec::with_capacity(data_len.min(MAX_PREALLOC));
    let got = reader
        .take(data_len as u64)
        .read_to_end(&mut data)
        .map_err(io_error)?;
    if got < data_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected,
            found: (header_len + got) as u64,
        });
    }
    // Reading to the end also makes the gzip decoder verify its checksum.
    let extra = io::copy(reader, &mut io::sink()).map_err(io_error)?;
    if extra > 0 {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            expected,
            found: expected + extra,
        });
    }
    Ok(data)
}

/// Like `read_exact`, but returns how many bytes it got before the end
/// instead of failing, so that a short file can be reported as truncated.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;

    /// Three 2x3 images with distinct pixels, and their labels.
    fn sample() -> (Vec<u8>, Vec<u8>) {
        ((0..18).collect(), vec![0, 9, 4])
    }

    fn idx_images(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [IMAGES_MAGIC, count, rows, cols] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        bytes.extend_from_slice(pixels);
        bytes
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [LABELS_MAGIC, labels.len() as u32] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        bytes.extend_from_slice(labels);
        bytes
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Writes the sample as a split; `.gz` names hold gzipped bytes.
    fn write_split(dir: &Path, split: Split, images: &[u8], labels: &[u8], gzipped: bool) {
        let suffix = if gzipped { ".gz" } else { "" };
        let encode = |bytes: &[u8]| if gzipped { gzip(bytes) } else { bytes.to_vec() };
        let images_name = format!("{}{suffix}", split.images_stem());
        let labels_name = format!("{}{suffix}", split.labels_stem());
        write(dir, &images_name, &encode(images));
        write(dir, &labels_name, &encode(labels));
    }

    fn write_sample_split(dir: &Path, split: Split, gzipped: bool) {
        let (pixels, labels) = sample();
        write_split(
            dir,
            split,
            &idx_images(3, 2, 3, &pixels),
            &idx_labels(&labels),
            gzipped,
        );
    }

    fn assert_tells_how_to_get_data(message: &str) {
        assert!(
            message.contains("apt-get install dataset-fashion-mnist")
                && message.contains("--data-dir"),
            "message does not say how to get the data: {message}"
        );
    }

    #[test]
    fn plain_and_gzipped_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (pixels, labels) = sample();
        for gzipped in [false, true] {
            let encode = |bytes: Vec<u8>| if gzipped { gzip(&bytes) } else { bytes };
            let images_path = write(dir.path(), "images", &encode(idx_images(3, 2, 3, &pixels)));
            let labels_path = write(dir.path(), "labels", &encode(idx_labels(&labels)));
            let images = read_idx_images(&images_path).unwrap();
            assert_eq!((images.count, images.rows, images.cols), (3, 2, 3));
            assert_eq!(images.pixels, pixels);
            assert_eq!(images.image(1), &[6, 7, 8, 9, 10, 11]);
            assert_eq!(read_idx_labels(&labels_path, NUM_CLASSES).unwrap(), labels);
        }
    }

    #[test]
    fn gzip_is_detected_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let (pixels, _) = sample();
        let bytes = idx_images(3, 2, 3, &pixels);
        let gz_named_plain = write(dir.path(), "plain.gz", &bytes);
        let plain_named_gz = write(dir.path(), "gzipped.idx", &gzip(&bytes));
        assert_eq!(read_idx_images(&gz_named_plain).unwrap().pixels, pixels);
        assert_eq!(read_idx_images(&plain_named_gz).unwrap().pixels, pixels);
    }

    #[test]
    fn load_split_reads_plain_or_gzipped_files() {
        for gzipped in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_sample_split(dir.path(), Split::Train, gzipped);
            let data = load_split(dir.path(), Split::Train).unwrap();
            assert_eq!(data.len(), 3);
            assert_eq!(data.image(2), &[12, 13, 14, 15, 16, 17]);
            assert_eq!(data.label(1), 9);
            assert_eq!(data.class_counts(), [1, 0, 0, 0, 1, 0, 0, 0, 0, 1]);
        }
    }

    #[test]
    fn bad_magic_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let labels = write(dir.path(), "labels", &idx_labels(&[1, 2, 3]));
        let err = read_idx_images(&labels).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::BadMagic {
                    expected: 0x803,
                    found: 0x801,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("labels"), "{err}");
        assert_tells_how_to_get_data(&err.to_string());
        let images = write(dir.path(), "images", &idx_images(1, 1, 1, &[0]));
        let err = read_idx_labels(&images, NUM_CLASSES).unwrap_err();
        assert!(
            matches!(err, DataError::BadMagic { kind: "labels", .. }),
            "{err:?}"
        );
        // Garbage shorter than a header is still the wrong file, not a short one.
        let junk = write(dir.path(), "junk", b"hello");
        assert!(matches!(
            read_idx_images(&junk),
            Err(DataError::BadMagic { .. })
        ));
    }

    #[test]
    fn truncated_image_data_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (pixels, _) = sample();
        let path = write(dir.path(), "images", &idx_images(3, 2, 3, &pixels[..17]));
        let err = read_idx_images(&path).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Truncated {
                    expected: 34,
                    found: 33,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        // Cut inside the header.
        let path = write(dir.path(), "header", &idx_images(3, 2, 3, &[])[..10]);
        assert!(matches!(
            read_idx_images(&path),
            Err(DataError::Truncated {
                expected: 16,
                found: 10,
                ..
            })
        ));
    }

    #[test]
    fn truncated_gzip_stream_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (pixels, _) = sample();
        let gz = gzip(&idx_images(3, 2, 3, &pixels));
        let path = write(dir.path(), "images.gz", &gz[..gz.len() - 6]);
        let err = read_idx_images(&path).unwrap_err();
        assert!(
            matches!(err, DataError::Io { .. } | DataError::Truncated { .. }),
            "{err:?}"
        );
        assert_tells_how_to_get_data(&err.to_string());
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (pixels, labels) = sample();
        let mut images = idx_images(3, 2, 3, &pixels);
        images.extend_from_slice(&[0; 5]);
        for (name, bytes) in [("images", images.clone()), ("images.gz", gzip(&images))] {
            let err = read_idx_images(&write(dir.path(), name, &bytes)).unwrap_err();
            assert!(
                matches!(
                    err,
                    DataError::TrailingBytes {
                        expected: 34,
                        found: 39,
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        let mut bytes = idx_labels(&labels);
        bytes.push(0);
        let err = read_idx_labels(&write(dir.path(), "labels", &bytes), NUM_CLASSES).unwrap_err();
        assert!(matches!(err, DataError::TrailingBytes { .. }), "{err:?}");
    }

    #[test]
    fn zero_or_absurd_dimensions_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for (count, rows, cols) in [(0, 28, 28), (1, 0, 28), (1, 28, 0), (1, 65536, 65536)] {
            let path = write(dir.path(), "images", &idx_images(count, rows, cols, &[]));
            let err = read_idx_images(&path).unwrap_err();
            assert!(
                matches!(err, DataError::BadHeader { .. }),
                "{count}x{rows}x{cols}: {err:?}"
            );
        }
        let path = write(dir.path(), "labels", &idx_labels(&[]));
        assert!(matches!(
            read_idx_labels(&path, NUM_CLASSES),
            Err(DataError::BadHeader { .. })
        ));
        // A header promising far more than the file holds is merely truncated,
        // and must not allocate what it promises.
        let path = write(
            dir.path(),
            "huge",
            &idx_images(u32::MAX, 4096, 4096, &[1, 2]),
        );
        assert!(matches!(
            read_idx_images(&path),
            Err(DataError::Truncated { found: 18, .. }) | Err(DataError::BadHeader { .. })
        ));
    }

    #[test]
    fn count_mismatch_between_images_and_labels_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (pixels, labels) = sample();
        write_split(
            dir.path(),
            Split::Test,
            &idx_images(3, 2, 3, &pixels),
            &idx_labels(&labels[..2]),
            true,
        );
        let err = load_split(dir.path(), Split::Test).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::CountMismatch {
                    image_count: 3,
                    label_count: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("t10k-labels-idx1-ubyte.gz"),
            "{err}"
        );
    }

    #[test]
    fn label_out_of_range_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "labels", &idx_labels(&[3, 9, 10, 0]));
        let err = read_idx_labels(&path, NUM_CLASSES).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    index: 2,
                    label: 10,
                    num_classes: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(read_idx_labels(&path, 11).is_ok());
        assert!(matches!(
            read_idx_labels(&path, 4),
            Err(DataError::LabelOutOfRange {
                index: 1,
                label: 9,
                ..
            })
        ));
    }

    #[test]
    fn missing_file_message_names_it_and_mentions_apt_get() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), Split::Train.images_stem(), b"not read");
        let err = load_split(dir.path(), Split::Train).unwrap_err();
        assert!(matches!(err, DataError::Missing { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("train-labels-idx1-ubyte"), "{message}");
        assert!(message.contains("train-labels-idx1-ubyte.gz"), "{message}");
        assert_tells_how_to_get_data(&message);

        let err = read_idx_images(&dir.path().join("nothing-here")).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Missing {
                    also_tried: None,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_tells_how_to_get_data(&err.to_string());
    }

    #[test]
    fn search_order_is_explicit_env_local_system() {
        assert_eq!(
            candidate_dirs(Some(OsStr::new("/from/env"))),
            [
                PathBuf::from("/from/env"),
                PathBuf::from("data/fashion-mnist"),
                PathBuf::from("/usr/share/datasets/fashion-mnist"),
            ]
        );
        let defaults = [
            PathBuf::from(LOCAL_DATA_DIR),
            PathBuf::from(SYSTEM_DATA_DIR),
        ];
        assert_eq!(candidate_dirs(None), defaults);
        assert_eq!(candidate_dirs(Some(OsStr::new(""))), defaults);

        let full = |name: &str| {
            let dir = tempfile::tempdir().unwrap();
            for split in Split::ALL {
                write_sample_split(dir.path(), split, name == "gz");
            }
            dir
        };
        let (explicit, env, local) = (full("plain"), full("gz"), full("plain"));
        let empty = tempfile::tempdir().unwrap();
        let nowhere = empty.path().join("does-not-exist");
        let paths = |dirs: &[&Path]| dirs.iter().map(|d| d.to_path_buf()).collect::<Vec<_>>();

        let candidates = paths(&[env.path(), local.path()]);
        assert_eq!(
            search_data_dir(Some(explicit.path()), &candidates, &Split::ALL).unwrap(),
            explicit.path()
        );
        assert_eq!(
            search_data_dir(None, &candidates, &Split::ALL).unwrap(),
            env.path()
        );
        // Candidates that lack the files are skipped.
        let candidates = paths(&[&nowhere, empty.path(), local.path()]);
        assert_eq!(
            search_data_dir(None, &candidates, &Split::ALL).unwrap(),
            local.path()
        );
    }

    #[test]
    fn explicit_dir_without_the_files_is_an_error() {
        let full = tempfile::tempdir().unwrap();
        for split in Split::ALL {
            write_sample_split(full.path(), split, true);
        }
        // Only the test split: training would fail later, so fail now.
        let partial = tempfile::tempdir().unwrap();
        write_sample_split(partial.path(), Split::Test, true);
        let err = search_data_dir(
            Some(partial.path()),
            &[full.path().to_path_buf()],
            &Split::ALL,
        )
        .unwrap_err();
        assert!(matches!(err, DataError::Missing { .. }), "{err:?}");
        assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
        assert_tells_how_to_get_data(&err.to_string());
        assert!(find_data_dir(Some(partial.path()), &Split::ALL).is_err());
    }

    #[test]
    fn not_found_lists_what_each_directory_lacks() {
        let partial = tempfile::tempdir().unwrap();
        write_sample_split(partial.path(), Split::Train, false);
        let nowhere = partial.path().join("does-not-exist");
        let err = search_data_dir(
            None,
            &[nowhere.clone(), partial.path().to_path_buf()],
            &Split::ALL,
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, DataError::NotFound { .. }), "{err:?}");
        assert!(
            message.contains(&format!("{} (no such directory)", nowhere.display())),
            "{message}"
        );
        assert!(
            message.contains("(no t10k-images-idx3-ubyte(.gz))"),
            "{message}"
        );
        assert_tells_how_to_get_data(&message);
    }

    #[test]
    fn committed_test_slice_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
        let data = load_split(&dir, Split::Test).unwrap();
        assert_eq!(data.len(), 1000);
        assert_eq!((data.images.rows, data.images.cols), (28, 28));
        assert_eq!(data.images.pixels.len(), 1000 * 28 * 28);
        let counts = data.class_counts();
        assert_eq!(counts.len(), NUM_CLASSES);
        assert!(
            counts.iter().all(|&n| n > 0),
            "a class is missing: {counts:?}"
        );
        assert_eq!(counts.iter().sum::<usize>(), 1000);
        // The first test image of Fashion-MNIST is an ankle boot.
        assert_eq!(data.label(0), 9);
    }

    /// The real data set, wherever [`find_data_dir`] finds it. Ignored by
    /// default because a fresh machine may not have it; run with
    /// `cargo test -p nin-train -- --ignored`.
    #[test]
    #[ignore = "needs the full Fashion-MNIST (apt-get install dataset-fashion-mnist)"]
    fn full_data_set_loads() {
        let dir = find_data_dir(None, &Split::ALL).unwrap();
        for (split, len) in [(Split::Train, 60_000), (Split::Test, 10_000)] {
            let data = load_split(&dir, split).unwrap();
            assert_eq!(data.len(), len);
            assert_eq!((data.images.rows, data.images.cols), (28, 28));
            // Fashion-MNIST is balanced: every class has a tenth of each split.
            assert_eq!(data.class_counts(), vec![len / NUM_CLASSES; NUM_CLASSES]);
        }
    }

    #[test]
    fn a_directory_with_only_the_test_split_serves_evaluation() {
        let slice = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
        assert_eq!(
            search_data_dir(Some(&slice), &[], &[Split::Test]).unwrap(),
            slice
        );
        assert!(search_data_dir(Some(&slice), &[], &Split::ALL).is_err());
    }
}
