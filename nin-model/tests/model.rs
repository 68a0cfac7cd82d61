//! The network end to end: shapes, seeding, gradients, weights files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use nin_model::weights::{self, Provenance, WeightsMetadata};
use nin_model::{Error, Nin, NinConfig};

fn trace_shapes(config: &NinConfig) -> Vec<Vec<usize>> {
    let (model, _) = Nin::init(config, 0, &Device::Cpu).unwrap();
    let s = config.input_size;
    let x = Tensor::zeros((1, config.in_channels, s, s), DType::F32, &Device::Cpu).unwrap();
    let trace = model.forward_trace(&x, false).unwrap();
    trace.iter().map(|(_, t)| t.dims().to_vec()).collect()
}

#[test]
fn d2l_layer_shapes_match_the_book() {
    let expected: Vec<Vec<usize>> = vec![
        vec![1, 96, 54, 54],
        vec![1, 96, 26, 26],
        vec![1, 256, 26, 26],
        vec![1, 256, 12, 12],
        vec![1, 384, 12, 12],
        vec![1, 384, 5, 5],
        vec![1, 384, 5, 5],
        vec![1, 10, 5, 5],
        vec![1, 10],
    ];
    assert_eq!(trace_shapes(&NinConfig::d2l()), expected);
}

#[test]
fn compact_layer_shapes() {
    // block1, pool1, block2, pool2, block3, pool3, dropout, head, gap.
    let expected: Vec<Vec<usize>> = vec![
        vec![1, 24, 26, 26],
        vec![1, 24, 25, 25],
        vec![1, 64, 14, 14],
        vec![1, 64, 13, 13],
        vec![1, 96, 6, 6],
        vec![1, 96, 2, 2],
        vec![1, 96, 2, 2],
        vec![1, 10, 2, 2],
        vec![1, 10],
    ];
    assert_eq!(trace_shapes(&NinConfig::compact()), expected);
}

#[test]
fn traced_shapes_agree_with_the_config_expansion() {
    let mut config = NinConfig::compact();
    config.mlp_convs = 1;
    config.batch_norm = true;
    let from_config: Vec<Vec<usize>> = config
        .layers()
        .unwrap()
        .iter()
        .map(|l| {
            let mut dims = vec![1];
            dims.extend(l.output);
            dims
        })
        .collect();
    let mut traced = trace_shapes(&config);
    traced.last_mut().unwrap().extend([1, 1]); // gap flattens (N, C, 1, 1)
    assert_eq!(traced, from_config);
}

#[test]
fn wrong_input_shape_is_an_error_not_a_panic() {
    let (model, _) = Nin::init(&NinConfig::compact(), 0, &Device::Cpu).unwrap();
    let x = Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward_t(&x, false).unwrap_err().to_string();
    assert!(err.contains("(N, 1, 28, 28)"), "{err}");
}

fn var_values(varmap: &candle_nn::VarMap) -> Vec<(String, Vec<f32>)> {
    let vars = varmap.data().lock().unwrap();
    let mut values: Vec<_> = vars
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    values.sort_by(|a, b| a.0.cmp(&b.0));
    values
}

fn batch(n: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * 28 * 28).map(|_| rng.random::<f32>()).collect();
    Tensor::from_vec(v, (n, 1, 28, 28), &Device::Cpu).unwrap()
}

#[test]
fn a_seed_gives_bit_identical_weights_and_dropout() {
    let config = NinConfig::compact();
    let (a, va) = Nin::init(&config, 42, &Device::Cpu).unwrap();
    let (b, vb) = Nin::init(&config, 42, &Device::Cpu).unwrap();
    let (_, vc) = Nin::init(&config, 43, &Device::Cpu).unwrap();
    assert_eq!(var_values(&va), var_values(&vb));
    assert_ne!(var_values(&va), var_values(&vc));

    // Training-mode forward passes use dropout: same seed, same masks.
    let x = batch(4, 1);
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let ya: Vec<f32> = a
            .forward_t(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let yb: Vec<f32> = b
            .forward_t(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ya, yb);
        outputs.push(ya);
    }
    // ... and the stream moves on: the second pass drops other values.
    assert_ne!(outputs[0], outputs[1]);
}

#[test]
fn every_parameter_gets_a_gradient() {
    for batch_norm in [false, true] {
        let config = NinConfig {
            batch_norm,
            ..NinConfig::compact()
        };
        let (model, varmap) = Nin::init(&config, 7, &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 3, 5, 9], &Device::Cpu).unwrap();
        let logits = model.forward_t(&batch(4, 2), true).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        let grads = loss.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        for (name, var) in vars.iter() {
            let is_buffer = name.ends_with("running_mean") || name.ends_with("running_var");
            match grads.get(var) {
                Some(g) if !is_buffer => {
                    let norm = g
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        norm > 0.0 && norm.is_finite(),
                        "{name}: gradient norm {norm}"
                    );
                }
                None if is_buffer => {}
                other => panic!("{name}: unexpected gradient presence {:?}", other.is_some()),
            }
        }
    }
}

fn metadata(config: &NinConfig) -> WeightsMetadata {
    WeightsMetadata::fashion_mnist(
        config.clone(),
        Provenance {
            dataset: "Fashion-MNIST".into(),
            epochs: 3,
            test_accuracy: Some(0.9),
            seed: Some(5),
            command: Some("test".into()),
            created_by: "nin-model tests".into(),
            trained_on: Some("cpu, native kernels".into()),
        },
    )
}

#[test]
fn save_then_load_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    for batch_norm in [false, true] {
        let config = NinConfig {
            batch_norm,
            ..NinConfig::compact()
        };
        let (model, varmap) = Nin::init(&config, 5, &Device::Cpu).unwrap();
        // Move the batch-norm running statistics away from their initial values.
        model.forward_t(&batch(8, 3), true).unwrap();
        weights::save(&path, &varmap, &metadata(&config)).unwrap();

        let (loaded, meta) = weights::load(&path, &Device::Cpu).unwrap();
        assert_eq!(meta, metadata(&config));
        assert_eq!(weights::read_metadata(&path).unwrap(), meta);
        let x = batch(3, 4);
        let before: Vec<f32> = model
            .forward_t(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let after: Vec<f32> = loaded
            .forward_t(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(before, after);
    }
    // Nothing but the weights file is left behind by the atomic write.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("w.safetensors")]);
}

/// Writes a valid file, then lets `edit` change its tensors and metadata.
fn edited_file(
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut HashMap<String, String>),
) -> std::path::PathBuf {
    let config = NinConfig::compact();
    let (_, varmap) = Nin::init(&config, 1, &Device::Cpu).unwrap();
    let good = dir.join("good.safetensors");
    weights::save(&good, &varmap, &metadata(&config)).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    edit(&mut tensors, &mut meta);
    let path = dir.join("edited.safetensors");
    std::fs::write(&path, safetensors::serialize(&tensors, Some(meta)).unwrap()).unwrap();
    path
}

fn load_err(path: &Path) -> Error {
    weights::load(path, &Device::Cpu).unwrap_err()
}

#[test]
fn unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_file(dir.path(), |_, meta| {
        meta.insert("format_version".into(), "99".into());
    });
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::UnsupportedVersion { found, .. } if found == "99"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_file(dir.path(), |tensors, _| {
        tensors.remove("block2.mlp1.weight");
    });
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "block2.mlp1.weight"),
        "{err}"
    );
}

#[test]
fn extra_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_file(dir.path(), |tensors, _| {
        tensors.insert(
            "fc.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::UnexpectedTensor { name, .. } if name == "fc.weight"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_file(dir.path(), |tensors, _| {
        tensors.insert(
            "head.conv.bias".into(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match load_err(&path) {
        Error::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "head.conv.bias");
            assert_eq!((expected, found), (vec![10], vec![7]));
        }
        err => panic!("unexpected error {err}"),
    }
}

#[test]
fn config_that_disagrees_with_the_tensors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_file(dir.path(), |_, meta| {
        let wider = NinConfig {
            mlp_convs: 1,
            ..NinConfig::compact()
        };
        meta.insert("config".into(), serde_json::to_string(&wider).unwrap());
    });
    // The file now holds mlp2 tensors that a 1-mlp-conv network does not use.
    assert!(matches!(load_err(&path), Error::UnexpectedTensor { .. }));
}

#[test]
fn damaged_metadata_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_file(dir.path(), |_, meta| {
        meta.insert("classes".into(), "[\"only one\"]".into());
    });
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::Metadata { reason, .. } if reason.contains("class names")),
        "{err}"
    );

    let path = edited_file(dir.path(), |_, meta| {
        meta.clear();
    });
    assert!(matches!(load_err(&path), Error::Metadata { .. }));
}

#[test]
fn truncated_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = edited_file(dir.path(), |_, _| {});
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(
        load_err(&truncated),
        Error::MalformedWeights { .. }
    ));

    let png = dir.path().join("picture.safetensors");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n not weights at all").unwrap();
    assert!(matches!(load_err(&png), Error::MalformedWeights { .. }));

    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(load_err(&empty), Error::MalformedWeights { .. }));

    let missing = dir.path().join("missing.safetensors");
    let err = load_err(&missing);
    assert!(matches!(&err, Error::Io { .. }) && err.to_string().contains("missing.safetensors"));
}

#[test]
fn save_refuses_tensors_that_do_not_match_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let (_, varmap) = Nin::init(&NinConfig::compact(), 1, &Device::Cpu).unwrap();
    let other = NinConfig {
        mlp_convs: 1,
        ..NinConfig::compact()
    };
    let path = dir.path().join("w.safetensors");
    assert!(weights::save(&path, &varmap, &metadata(&other)).is_err());
    assert!(!path.exists());
}

#[test]
fn ablation_and_width_knobs_build_working_networks() {
    let mut config = NinConfig::compact();
    let full = param_count(&config);
    config.mlp_convs = 1;
    let one = param_count(&config);
    assert!(one < full);
    config.blocks[0].channels = 8;
    config.num_classes = 4;
    let (model, _) = Nin::init(&config, 0, &Device::Cpu).unwrap();
    let y = model.forward_t(&batch(2, 0), false).unwrap();
    assert_eq!(y.dims(), &[2, 4]);
}

fn param_count(config: &NinConfig) -> usize {
    Nin::parameter_shapes(config)
        .unwrap()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}
