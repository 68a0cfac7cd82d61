//! Writes the seed inputs of both fuzz targets into `fuzz/corpus/<target>/`
//! (`seed-*` files):
//!
//! - `decode`: real Fashion-MNIST test images (the committed slice in
//!   `tests/data/`) as PNG (grey, 16-bit, RGBA on a transparent ground),
//!   JPEG, WebP, GIF and BMP, at the native 28x28 and at other sizes, so
//!   the fuzzer starts from every decoder and every preprocessing branch
//!   (inversion, crop, resize);
//! - `v2_request`: valid inference bodies (FP32 and UINT8, flat and
//!   nested, a batch of two, chosen outputs) and typical mistakes (NaN,
//!   wrong shape, name, datatype, length, too many images, not JSON),
//!   and bodies with binary tensor data (`BIN` + the JSON's length, see
//!   the target);
//! - `grpc_infer`: encoded `ModelInferRequest`s with raw and typed
//!   contents, FP32 and UINT8, and the same typical mistakes.
//!
//! Run: `cargo run -p nin-fuzz --example make_seeds`.

use std::error::Error;
use std::fs;
use std::io::Cursor;
use std::path::Path;

use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageFormat, Luma, LumaA, Rgba, RgbaImage};

const SIDE: u32 = 28;

fn main() -> Result<(), Box<dyn Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let images = read_slice(&root.join("../tests/data/t10k-images-idx3-ubyte.gz"))?;
    decode_seeds(&images, &root.join("corpus/decode"))?;
    v2_seeds(&images, &root.join("corpus/v2_request"))?;
    grpc_seeds(&images, &root.join("corpus/grpc_infer"))?;
    Ok(())
}

/// Encoded `ModelInferRequest`s: what tritonclient.grpc and perf_analyzer
/// send (raw contents), the typed contents, and mistakes.
fn grpc_seeds(images: &[GrayImage], dir: &Path) -> Result<(), Box<dyn Error>> {
    use nin_serve::grpc::proto::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };
    use nin_serve::grpc::proto::{InferTensorContents, ModelInferRequest};
    use prost::Message;

    fs::create_dir_all(dir)?;
    let write = |name: &str, request: ModelInferRequest| {
        fs::write(dir.join(format!("seed-{name}.pb")), request.encode_to_vec())
    };
    let input =
        |datatype: &str, shape: Vec<i64>, contents: Option<InferTensorContents>| InferInputTensor {
            name: "input".into(),
            datatype: datatype.into(),
            shape,
            contents,
            ..Default::default()
        };
    let one = vec![1, 1, 28, 28];
    let bytes = |i: usize| images[i].as_raw().clone();
    let fp32 = |i: usize| -> Vec<f32> { bytes(i).iter().map(|&b| f32::from(b) / 255.0).collect() };
    let raw_fp32 = |i: usize| -> Vec<u8> { fp32(i).iter().flat_map(|v| v.to_le_bytes()).collect() };
    let request = |inputs, raw_input_contents, outputs: &[&str]| ModelInferRequest {
        model_name: "nin".into(),
        inputs,
        raw_input_contents,
        outputs: outputs
            .iter()
            .map(|name| InferRequestedOutputTensor {
                name: name.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };

    write(
        "raw-fp32",
        request(
            vec![input("FP32", one.clone(), None)],
            vec![raw_fp32(0)],
            &[],
        ),
    )?;
    write(
        "raw-uint8-batch",
        request(
            vec![input("UINT8", vec![2, 1, 28, 28], None)],
            vec![[bytes(1), bytes(2)].concat()],
            &["probabilities", "logits"],
        ),
    )?;
    let typed = |fp32_contents, uint_contents| {
        Some(InferTensorContents {
            fp32_contents,
            uint_contents,
            ..Default::default()
        })
    };
    write(
        "typed-fp32",
        request(
            vec![input("FP32", one.clone(), typed(fp32(3), vec![]))],
            vec![],
            &["logits"],
        ),
    )?;
    let uint: Vec<u32> = bytes(4).iter().map(|&b| u32::from(b)).collect();
    write(
        "typed-uint8",
        request(
            vec![input("UINT8", one.clone(), typed(vec![], uint.clone()))],
            vec![],
            &[],
        ),
    )?;
    write(
        "typed-mismatch",
        request(
            vec![input("FP32", one.clone(), typed(vec![], uint))],
            vec![],
            &[],
        ),
    )?;
    write(
        "raw-and-typed",
        request(
            vec![input("FP32", one.clone(), typed(fp32(5), vec![]))],
            vec![raw_fp32(5)],
            &[],
        ),
    )?;
    write(
        "raw-short",
        request(
            vec![input("FP32", one.clone(), None)],
            vec![vec![0; 13]],
            &[],
        ),
    )?;
    write(
        "nan",
        request(
            vec![input(
                "FP32",
                one.clone(),
                typed(vec![f32::NAN; 784], vec![]),
            )],
            vec![],
            &[],
        ),
    )?;
    write(
        "too-many",
        request(
            vec![input("UINT8", vec![9, 1, 28, 28], None)],
            vec![vec![0; 9 * 784]],
            &[],
        ),
    )?;
    write(
        "unknown-output",
        request(
            vec![input("UINT8", one, None)],
            vec![bytes(6)],
            &["features"],
        ),
    )?;
    Ok(())
}

/// The images of an IDX file (gzipped): 16-byte header, then 28x28 bytes each.
/// The slice's images, read by nin-train's IDX reader.
fn read_slice(path: &Path) -> Result<Vec<GrayImage>, Box<dyn Error>> {
    let images = nin_train::data::read_idx_images(path)?;
    assert_eq!((images.rows, images.cols), (SIDE as usize, SIDE as usize));
    Ok((0..images.count)
        .map(|i| GrayImage::from_raw(SIDE, SIDE, images.image(i).to_vec()).expect("28x28 bytes"))
        .collect())
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Result<Vec<u8>, Box<dyn Error>> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format)?;
    Ok(out.into_inner())
}

fn decode_seeds(images: &[GrayImage], dir: &Path) -> Result<(), Box<dyn Error>> {
    fs::create_dir_all(dir)?;
    let write = |name: &str, bytes: Vec<u8>| fs::write(dir.join(format!("seed-{name}")), bytes);
    // The first image of a few different classes (0 T-shirt ... 9 boot).
    let pick = |i: usize| DynamicImage::ImageLuma8(images[i].clone());
    // A photo-like version: dark garment on white paper, larger, not square.
    let photo = |i: usize, w: u32, h: u32| {
        let mut inverted = images[i].clone();
        imageops::invert(&mut inverted);
        let big = imageops::resize(&inverted, w / 2, h / 2, FilterType::Triangle);
        let mut canvas = GrayImage::from_pixel(w, h, Luma([255]));
        imageops::overlay(&mut canvas, &big, i64::from(w / 4), i64::from(h / 4));
        DynamicImage::ImageLuma8(canvas)
    };

    write("native.png", encode(&pick(0), ImageFormat::Png)?)?;
    write(
        "native16.png",
        encode(
            &DynamicImage::ImageLuma16(pick(1).to_luma16()),
            ImageFormat::Png,
        )?,
    )?;
    let transparent = RgbaImage::from_fn(40, 36, |x, y| {
        let v = images[2].get_pixel(x * SIDE / 40, y * SIDE / 36).0[0];
        Rgba([0, 0, 0, v])
    });
    write(
        "alpha.png",
        encode(&DynamicImage::ImageRgba8(transparent), ImageFormat::Png)?,
    )?;
    let grey_alpha = image::ImageBuffer::from_fn(SIDE, SIDE, |x, y| {
        LumaA([images[3].get_pixel(x, y).0[0], 200])
    });
    write(
        "grey-alpha.png",
        encode(&DynamicImage::ImageLumaA8(grey_alpha), ImageFormat::Png)?,
    )?;
    write("native.jpg", encode(&pick(4), ImageFormat::Jpeg)?)?;
    write(
        "photo.jpg",
        encode(
            &DynamicImage::ImageRgb8(photo(5, 48, 64).to_rgb8()),
            ImageFormat::Jpeg,
        )?,
    )?;
    write("native.webp", encode(&pick(6), ImageFormat::WebP)?)?;
    write(
        "photo.webp",
        encode(
            &DynamicImage::ImageRgba8(photo(7, 60, 40).to_rgba8()),
            ImageFormat::WebP,
        )?,
    )?;
    write(
        "native.gif",
        encode(
            &DynamicImage::ImageRgba8(pick(8).to_rgba8()),
            ImageFormat::Gif,
        )?,
    )?;
    write(
        "photo.gif",
        encode(
            &DynamicImage::ImageRgba8(photo(9, 36, 36).to_rgba8()),
            ImageFormat::Gif,
        )?,
    )?;
    write(
        "native.bmp",
        encode(
            &DynamicImage::ImageRgb8(pick(10).to_rgb8()),
            ImageFormat::Bmp,
        )?,
    )?;
    write("photo.bmp", encode(&photo(11, 30, 20), ImageFormat::Bmp)?)?;
    Ok(())
}

fn v2_seeds(images: &[GrayImage], dir: &Path) -> Result<(), Box<dyn Error>> {
    fs::create_dir_all(dir)?;
    let write = |name: &str, body: String| fs::write(dir.join(format!("seed-{name}.json")), body);
    let bytes = |i: usize| images[i].as_raw().clone();
    let uint8 = |i: usize| serde_json::to_string(&bytes(i)).expect("numbers");
    let fp32 = |i: usize| {
        let v: Vec<f32> = bytes(i).iter().map(|&b| f32::from(b) / 255.0).collect();
        serde_json::to_string(&v).expect("numbers")
    };
    let nested = |i: usize| {
        let rows: Vec<&[u8]> = images[i].as_raw().chunks(SIDE as usize).collect();
        serde_json::to_string(&[[rows]]).expect("numbers")
    };
    let body = |shape: &str, datatype: &str, data: &str, rest: &str| {
        format!(
            r#"{{"id":"seed","inputs":[{{"name":"input","shape":{shape},"datatype":"{datatype}","data":{data}}}]{rest}}}"#
        )
    };
    let one = "[1,1,28,28]";

    write("uint8-flat", body(one, "UINT8", &uint8(0), ""))?;
    write("fp32-flat", body(one, "FP32", &fp32(1), ""))?;
    write(
        "uint8-nested",
        body(
            one,
            "UINT8",
            &nested(2),
            r#","outputs":[{"name":"probabilities"}]"#,
        ),
    )?;
    let two = format!("[{},{}]", &uint8(3)[..], &uint8(4)[..]);
    write(
        "batch-of-two",
        body(
            "[2,1,28,28]",
            "UINT8",
            &two,
            r#","outputs":[{"name":"logits"},{"name":"probabilities"},{"name":"logits"}],"parameters":{}"#,
        ),
    )?;
    write("nan-literal", body(one, "FP32", "[0.5,NaN]", ""))?;
    write(
        "nan-string",
        body(one, "FP32", r#"[0.5,"NaN","-Infinity"]"#, ""),
    )?;
    write("out-of-range", body(one, "UINT8", "[256,-1,0.5,1e400]", ""))?;
    write("short", body(one, "UINT8", "[1,2,3]", ""))?;
    write("wrong-shape", body("[1,3,28,28]", "FP32", "[]", ""))?;
    write("wrong-datatype", body(one, "FP16", "[0]", ""))?;
    write("too-many", body("[1000000,1,28,28]", "UINT8", "[]", ""))?;
    write(
        "unknown-output",
        body(
            one,
            "UINT8",
            &uint8(5),
            r#","outputs":[{"name":"features"}]"#,
        ),
    )?;
    write(
        "wrong-name",
        r#"{"inputs":[{"name":"x","shape":[1,1,28,28],"datatype":"FP32","data":[[[0]]]}]}"#.into(),
    )?;
    write("two-inputs", r#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[]},{"name":"input","shape":[1],"datatype":"FP32","data":[]}]}"#.into())?;
    write(
        "not-json",
        r#"{"inputs":[{"name":"input","shape":[1,1,28"#.into(),
    )?;
    write(
        "wrong-types",
        r#"{"id":7,"inputs":"input","outputs":null}"#.into(),
    )?;

    // Binary tensor data: `BIN`, the JSON's length (u32, little-endian),
    // the JSON, the raw tensor.
    let binary = |name: &str, json: String, data: &[u8]| {
        let mut input = b"BIN".to_vec();
        input.extend_from_slice(&(json.len() as u32).to_le_bytes());
        input.extend_from_slice(json.as_bytes());
        input.extend_from_slice(data);
        fs::write(dir.join(format!("seed-{name}.bin")), input)
    };
    let header = |datatype: &str, size: usize, rest: &str| {
        format!(
            r#"{{"inputs":[{{"name":"input","shape":[1,1,28,28],"datatype":"{datatype}","parameters":{{"binary_data_size":{size}}}}}]{rest}}}"#
        )
    };
    binary(
        "binary-uint8",
        header("UINT8", 784, r#","parameters":{"binary_data_output":true}"#),
        &bytes(7),
    )?;
    let fp32_bytes: Vec<u8> = bytes(8)
        .iter()
        .flat_map(|&b| (f32::from(b) / 255.0).to_le_bytes())
        .collect();
    binary(
        "binary-fp32",
        header(
            "FP32",
            4 * 784,
            r#","outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]"#,
        ),
        &fp32_bytes,
    )?;
    binary("binary-short", header("UINT8", 784, ""), &bytes(9)[..700])?;
    binary("binary-extra", header("UINT8", 700, ""), &bytes(9))?;
    Ok(())
}
