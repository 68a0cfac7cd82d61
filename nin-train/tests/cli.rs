//! The `nin-train` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use nin_model::weights::{self, Provenance, WeightsMetadata};
use nin_model::{Nin, NinConfig};

fn slice_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

/// An untrained compact network saved with `recorded` as its test accuracy.
fn weights_file(dir: &Path, recorded: Option<f64>) -> PathBuf {
    let config = NinConfig::compact();
    let (_, varmap) = Nin::init(&config, 2, &Device::Cpu).unwrap();
    let provenance = Provenance {
        test_accuracy: recorded,
        ..Provenance::default()
    };
    let path = dir.join("w.safetensors");
    weights::save(
        &path,
        &varmap,
        &WeightsMetadata::fashion_mnist(config, provenance),
    )
    .unwrap();
    path
}

fn nin_train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nin-train"))
        .args(args)
        .env_remove("NIN_DATA_DIR")
        .output()
        .unwrap()
}

#[test]
fn eval_json_has_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let weights = weights_file(dir.path(), None);
    let out = nin_train(&[
        "eval",
        "--weights",
        weights.to_str().unwrap(),
        "--data-dir",
        slice_dir().to_str().unwrap(),
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["count"], 1000);
    let accuracy = json["accuracy"].as_f64().unwrap();
    assert!(json["loss"].as_f64().unwrap() > 0.0);
    assert_eq!(json["per_class"].as_array().unwrap().len(), 10);
    let confusion: Vec<Vec<u64>> = json["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        })
        .collect();
    let total: u64 = confusion.iter().flatten().sum();
    assert_eq!(total, 1000);
    // The accuracy is the confusion matrix's diagonal over the count.
    let right: u64 = (0..10).map(|i| confusion[i][i]).sum();
    assert_eq!(accuracy, right as f64 / 1000.0);
}

#[test]
fn check_recorded_fails_when_the_accuracy_moved() {
    let dir = tempfile::tempdir().unwrap();
    let data = slice_dir();
    let measure = |weights: &Path, check: bool, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--weights",
            weights.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--json",
        ];
        if check {
            args.push("--check-recorded");
        }
        args.extend_from_slice(extra);
        nin_train(&args)
    };
    let weights = weights_file(dir.path(), Some(0.0));
    let out = measure(&weights, false, &[]);
    let accuracy = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["accuracy"]
        .as_f64()
        .unwrap();

    let wrong = measure(&weights_file(dir.path(), Some(accuracy + 0.01)), true, &[]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("differs from"));

    let right = measure(&weights_file(dir.path(), Some(accuracy)), true, &[]);
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );

    // Half an image of the slice's 1,000 off: within the default
    // tolerance of 0.001, not within an exact one.
    let close = weights_file(dir.path(), Some(accuracy + 0.0005));
    let default = measure(&close, true, &[]);
    assert!(
        default.status.success(),
        "{}",
        String::from_utf8_lossy(&default.stderr)
    );
    let exact = measure(&close, true, &["--tolerance", "0"]);
    assert!(!exact.status.success());
    assert!(String::from_utf8_lossy(&exact.stderr).contains("tolerance 0)"));
}

#[test]
fn fit_takes_resume_or_overwrite_not_both() {
    let out = nin_train(&["fit", "--resume", "--overwrite"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn missing_data_and_bad_weights_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let weights = weights_file(dir.path(), None);
    let out = nin_train(&[
        "eval",
        "--weights",
        weights.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("apt-get install dataset-fashion-mnist"));

    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not weights").unwrap();
    let out = nin_train(&["eval", "--weights", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("junk.safetensors"));
}

#[test]
fn every_subcommand_has_help() {
    for sub in ["fit", "eval", "download"] {
        let out = nin_train(&[sub, "--help"]);
        assert!(out.status.success(), "{sub}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
}
