//! Self-describing weights files.
//!
//! A nin weights file is a plain safetensors file whose `__metadata__`
//! carries everything needed to use the tensors: the format version, the
//! [`NinConfig`], the class names, the [`Preprocessing`] recipe and where
//! the weights came from ([`Provenance`]). The server therefore needs only
//! the file; nobody copies a config or a mean/std by hand.
//!
//! Writes are atomic (temporary file in the same directory, fsync, rename,
//! fsync of the directory), so a crash leaves the old file or the new one,
//! never a torn one. Reads check the file against its own config and refuse
//! it with a typed [`Error`] naming the problem.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::preprocess::Preprocessing;
use crate::{Error, Nin, NinConfig, Result};

/// Version of the metadata layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Value of the `format` metadata key, marking a file as nin's.
const FORMAT_NAME: &str = "nin-weights";

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Everything stored beside the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightsMetadata {
    /// The network the tensors belong to.
    pub config: NinConfig,
    /// Class names, one per output logit, in label order.
    pub classes: Vec<String>,
    /// How an image becomes an input for these weights.
    pub preprocessing: Preprocessing,
    /// How the weights were made.
    pub provenance: Provenance,
}

/// Where weights came from, so a user can judge and reproduce them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Data set the weights were trained on.
    pub dataset: String,
    /// Completed training epochs.
    pub epochs: usize,
    /// Accuracy on the data set's test split, as measured by `nin-train eval`.
    pub test_accuracy: Option<f64>,
    /// Seed of the run (initialisation, shuffling, dropout).
    pub seed: Option<u64>,
    /// The command that produced the weights.
    pub command: Option<String>,
    /// Program and version that wrote the file.
    pub created_by: String,
    /// Where the run computed ("cuda:0 (compute capability 90), generic
    /// kernels"): kernel sets and devices round differently, so a run is
    /// reproduced bit for bit only on the same ones. Absent in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_on: Option<String>,
}

impl WeightsMetadata {
    /// Metadata for a network trained on Fashion-MNIST.
    pub fn fashion_mnist(config: NinConfig, provenance: Provenance) -> Self {
        let preprocessing = Preprocessing::fashion_mnist(config.input_size);
        Self {
            config,
            classes: FASHION_MNIST_CLASSES
                .iter()
                .map(|c| c.to_string())
                .collect(),
            preprocessing,
            provenance,
        }
    }

    fn to_map(&self) -> Result<HashMap<String, String>> {
        Ok(HashMap::from([
            ("format".to_string(), FORMAT_NAME.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("config".to_string(), json(&self.config)?),
            ("classes".to_string(), json(&self.classes)?),
            ("preprocessing".to_string(), json(&self.preprocessing)?),
            ("provenance".to_string(), json(&self.provenance)?),
        ]))
    }

    fn from_map(path: &Path, map: Option<&HashMap<String, String>>) -> Result<Self> {
        let bad = |reason: String| Error::Metadata {
            path: path.to_path_buf(),
            reason,
        };
        let map = map.ok_or_else(|| bad("no metadata at all (not a nin weights file?)".into()))?;
        let get = |key: &str| {
            map.get(key)
                .ok_or_else(|| bad(format!("missing key `{key}`")))
        };
        if get("format")? != FORMAT_NAME {
            return Err(bad(format!("`format` is not `{FORMAT_NAME}`")));
        }
        let version = get("format_version")?;
        if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version.clone(),
                supported: FORMAT_VERSION,
            });
        }
        fn parse<T: serde::de::DeserializeOwned>(
            key: &str,
            text: &str,
        ) -> std::result::Result<T, String> {
            serde_json::from_str(text).map_err(|e| format!("`{key}`: {e}"))
        }
        let metadata = Self {
            config: parse("config", get("config")?).map_err(bad)?,
            classes: parse("classes", get("classes")?).map_err(bad)?,
            preprocessing: parse("preprocessing", get("preprocessing")?).map_err(bad)?,
            provenance: parse("provenance", get("provenance")?).map_err(bad)?,
        };
        metadata.check().map_err(bad)?;
        Ok(metadata)
    }

    /// Consistency that serde cannot express.
    fn check(&self) -> std::result::Result<(), String> {
        self.config.validate().map_err(|e| e.to_string())?;
        if self.classes.len() != self.config.num_classes {
            return Err(format!(
                "{} class names for a network with {} classes",
                self.classes.len(),
                self.config.num_classes
            ));
        }
        if self.preprocessing.size != self.config.input_size {
            return Err(format!(
                "preprocessing makes {}x{} inputs, the network takes {}x{}",
                self.preprocessing.size,
                self.preprocessing.size,
                self.config.input_size,
                self.config.input_size
            ));
        }
        Ok(())
    }
}

pub(crate) fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Config(e.to_string()))
}

/// Tensors read from a file and checked against its metadata.
#[derive(Debug)]
pub struct Weights {
    pub metadata: WeightsMetadata,
    /// Every tensor the config needs, by name, on the requested device.
    pub tensors: HashMap<String, Tensor>,
}

/// Writes the variables of a trained network and their metadata, atomically.
/// Refuses (before touching the disk) tensors that do not match the config,
/// so a file that could not be loaded back is never written.
pub fn save(path: &Path, varmap: &VarMap, metadata: &WeightsMetadata) -> Result<()> {
    metadata.check().map_err(Error::Config)?;
    let tensors: BTreeMap<String, Tensor> = {
        let vars = varmap.data().lock().expect("VarMap lock poisoned");
        vars.iter()
            .map(|(name, var)| {
                Ok((
                    name.clone(),
                    var.as_tensor().to_device(&Device::Cpu)?.contiguous()?,
                ))
            })
            .collect::<Result<_>>()?
    };
    let shapes = tensors.iter().map(|(n, t)| (n.as_str(), t.dims().to_vec()));
    check_tensors(path, &metadata.config, shapes)?;
    let bytes = safetensors::serialize(&tensors, Some(metadata.to_map()?)).map_err(|e| {
        Error::MalformedWeights {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    write_atomically(path, &bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads only the metadata (cheap: the tensors are not decoded).
pub fn read_metadata(path: &Path) -> Result<WeightsMetadata> {
    let bytes = read_file(path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| malformed(path, e))?;
    WeightsMetadata::from_map(path, header.metadata().as_ref())
}

/// Reads a weights file and checks every tensor against the config it carries.
pub fn read(path: &Path, device: &Device) -> Result<Weights> {
    let bytes = read_file(path)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| malformed(path, e))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| malformed(path, e))?;
    let metadata = WeightsMetadata::from_map(path, header.metadata().as_ref())?;
    let views = file.tensors();
    let shapes = views.iter().map(|(n, v)| (n.as_str(), v.shape().to_vec()));
    check_tensors(path, &metadata.config, shapes)?;
    let mut tensors = HashMap::new();
    for (name, view) in views {
        use candle_core::safetensors::Load;
        let bad = |reason: String| Error::MalformedWeights {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}` {reason}"),
        };
        let tensor = view
            .load(device)
            .map_err(|e| bad(format!("cannot be loaded: {e}")))?;
        if !tensor.dtype().is_float() {
            return Err(bad(format!(
                "has dtype {:?}, expected floats",
                tensor.dtype()
            )));
        }
        let tensor = tensor.to_dtype(DType::F32)?;
        // A NaN or infinity would load, warm up and then answer every
        // request with NaN: refuse it here, where the file can be named.
        if !tensor
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite())
        {
            return Err(bad("holds NaN or infinite values".into()));
        }
        tensors.insert(name, tensor);
    }
    Ok(Weights { metadata, tensors })
}

/// Reads a weights file and builds the network it describes, for inference.
pub fn load(path: &Path, device: &Device) -> Result<(Nin, WeightsMetadata)> {
    let Weights { metadata, tensors } = read(path, device)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let model = Nin::new(&metadata.config, vb)?;
    Ok((model, metadata))
}

/// Compares the tensors present with those `config` needs: every one
/// present, none extra, each with the right shape.
fn check_tensors<'a>(
    path: &Path,
    config: &NinConfig,
    present: impl Iterator<Item = (&'a str, Vec<usize>)>,
) -> Result<()> {
    let mut present: BTreeMap<&str, Vec<usize>> = present.collect();
    for (name, expected) in Nin::parameter_shapes(config)? {
        let found = present
            .remove(name.as_str())
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.clone(),
            })?;
        if found != expected {
            return Err(Error::ShapeMismatch {
                path: path.to_path_buf(),
                name,
                expected,
                found,
            });
        }
    }
    match present.into_keys().next() {
        Some(extra) => Err(Error::UnexpectedTensor {
            path: path.to_path_buf(),
            name: extra.to_string(),
        }),
        None => Ok(()),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn malformed(path: &Path, e: safetensors::SafeTensorError) -> Error {
    Error::MalformedWeights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Prefix and suffix of [`write_atomically`]'s temporary files.
const TEMPORARY: (&str, &str) = (".nin-", ".tmp");

/// Removes the temporary files that writes in `dir` cut short by a crash
/// (SIGKILL, power loss) left behind; each is as large as the file it was
/// replacing. Only for a directory one process writes to, at its start:
/// another writer's file in progress would be removed too. Returns how many
/// were removed.
pub fn remove_stale_temporaries(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMPORARY.0)
            && name.ends_with(TEMPORARY.1)
            && entry.file_type()?.is_file()
        {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Replaces `path` with `bytes` so that readers (and a crash) see either
/// the old content or the new, never a mix: write a temporary file in the
/// same directory, fsync it, then [`rename_durably`] it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = tempfile::Builder::new()
        .prefix(TEMPORARY.0)
        .suffix(TEMPORARY.1)
        .tempfile_in(parent_dir(path))?;
    file.write_all(bytes)?;
    // tempfile creates 0600; a weights file is meant to be shared like any other.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    file.as_file().sync_all()?;
    // Removed when dropped, so a failed rename leaves nothing behind.
    let temporary = file.into_temp_path();
    rename_durably(&temporary, path)?;
    // Renamed: nothing is left to remove.
    let _ = temporary.keep();
    Ok(())
}

/// The last step of every atomic file write here (weights, checkpoints,
/// exports, and nin-train's downloads, which stream into a `.part` file):
/// renames the finished, already synced `from` over `to` in the same
/// directory, then fsyncs the directory, because the rename is durable only
/// once the directory entry is on disk. That last sync is best effort: some
/// file systems refuse to sync a directory, and the file itself is on disk.
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    #[cfg(unix)]
    {
        let dir = parent_dir(to);
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::debug!(dir = %dir.display(), "cannot sync directory: {e}");
        }
    }
    Ok(())
}

/// The directory that holds `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomically_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        std::fs::write(&path, b"old").unwrap();
        write_atomically(&path, b"new content").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new content");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["w.safetensors"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), 0);
    }

    #[test]
    fn a_failed_rename_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let (part, dest) = (dir.path().join("f.part"), dir.path().join("f"));
        std::fs::write(&dest, b"old").unwrap();
        assert!(rename_durably(&part, &dest).is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        std::fs::write(&part, b"new").unwrap();
        rename_durably(&part, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert!(!part.exists());
    }
}
