//! The code generated from vendored `.proto` files (`codegen/`) is
//! committed, so that no build runs a code generator. Every crate's
//! `generated/*.rs` records on its first line the MD5 of each `.proto` file
//! it came from; here they are recomputed. An edit to a `.proto` file
//! without `cargo run --manifest-path codegen/Cargo.toml` fails.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use md5::{Digest, Md5};

/// `name.proto` -> MD5 as hex, for every `.proto` file in `dir`.
fn digests(dir: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "proto") {
            let digest = Md5::digest(fs::read(&path).unwrap());
            let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            found.insert(name, hex);
        }
    }
    found
}

/// The `file.proto md5=hex` pairs of a generated file's first line.
fn recorded(code: &str) -> BTreeMap<String, String> {
    let words: Vec<&str> = code.lines().next().unwrap_or("").split(' ').collect();
    words
        .windows(2)
        .filter_map(|pair| {
            let md5 = pair[1].strip_prefix("md5=")?;
            pair[0]
                .ends_with(".proto")
                .then(|| (pair[0].to_string(), md5.to_string()))
        })
        .collect()
}

#[test]
fn generated_code_matches_the_proto_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut checked = Vec::new();
    for krate in ["nin-model", "nin-serve"] {
        let generated = root.join(krate).join("generated");
        for entry in fs::read_dir(&generated).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let code = fs::read_to_string(&path).unwrap();
                assert_eq!(
                    recorded(&code),
                    digests(&root.join(krate).join("proto")),
                    "{} is stale: run `cargo run --manifest-path codegen/Cargo.toml`",
                    path.display()
                );
                checked.push(path);
            }
        }
    }
    assert_eq!(
        checked.len(),
        2,
        "expected onnx.rs and inference.rs: {checked:?}"
    );
}
