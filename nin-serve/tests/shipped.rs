//! The shipped weights, served end to end: what a user of the repository
//! gets from `cargo run --release -p nin-serve`.
//!
//! Guards the promise that serving and evaluation share one preprocessing
//! path: the committed real test slice, posted as PNG, must get exactly
//! the predictions `nin-train eval` computes on the raw tensors; as JPEG
//! (lossy) nearly all of them; and photo-like versions (dark garment on a
//! white, tinted, 600x800 RGB canvas) must still be classified correctly.

mod common;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::Device;
use common::TestServer;
use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, Rgb, RgbImage};
use nin_model::preprocess::gray_image;
use nin_serve::Config;
use nin_train::data::{load_split, Dataset, Split};
use nin_train::eval::evaluate;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

fn shipped_weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../weights/nin-fashion-mnist.safetensors")
}

fn test_slice() -> Dataset {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    load_split(&dir, Split::Test).unwrap()
}

fn image_of(data: &Dataset, i: usize) -> DynamicImage {
    let pixels = data.image(i).to_vec();
    gray_image(pixels, 28, 28).unwrap()
}

fn encode_png(image: &DynamicImage) -> Vec<u8> {
    common::png(image)
}

fn encode_jpeg(image: &DynamicImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(Cursor::new(&mut out), quality)
        .encode_image(image)
        .unwrap();
    out
}

/// A data-set image as a user might photograph it: a dark garment on white
/// paper under warm light, scaled up 15x, in a 600x800 RGB frame.
fn photo_like(image: &DynamicImage) -> DynamicImage {
    let gray: GrayImage = image.to_luma8();
    let big = image::imageops::resize(&gray, 420, 420, FilterType::CatmullRom);
    let mut photo = RgbImage::from_pixel(600, 800, Rgb([255, 250, 240]));
    for (x, y, pixel) in big.enumerate_pixels() {
        let v = 255.0 - f32::from(pixel.0[0]);
        let tint = |scale: f32| (v * scale).round().clamp(0.0, 255.0) as u8;
        photo.put_pixel(x + 90, y + 150, Rgb([tint(1.0), tint(0.98), tint(0.94)]));
    }
    DynamicImage::ImageRgb8(photo)
}

/// Class ids the server gives the images, in order, through multipart
/// requests of at most `max_batch` images.
async fn classify_all(
    server: &TestServer,
    images: &[Vec<u8>],
    mime: &str,
    chunk: usize,
) -> Vec<usize> {
    let client = reqwest::Client::new();
    let mut predicted = Vec::with_capacity(images.len());
    for part in images.chunks(chunk) {
        let mut form = Form::new();
        for bytes in part {
            form = form.part(
                "image",
                Part::bytes(bytes.clone())
                    .file_name("image")
                    .mime_str(mime)
                    .unwrap(),
            );
        }
        let response = client
            .post(server.url("/classify?top_k=1"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), part.len());
        predicted.extend(
            results
                .iter()
                .map(|r| r["class_id"].as_u64().unwrap() as usize),
        );
    }
    predicted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_weights_serve_what_eval_measures() {
    let weights = shipped_weights();
    let data = test_slice();
    let n = data.len();
    let server = TestServer::start_with_weights(&weights, |c| c.max_batch = 32).await;

    // What `nin-train eval` computes, image by image, on the raw tensors.
    let (model, metadata) = nin_model::weights::load(&weights, &Device::Cpu).unwrap();
    let eval_predictions: Vec<usize> = (0..n)
        .map(|i| {
            let one = evaluate(
                &model,
                &data,
                Some(&[i]),
                &metadata.preprocessing,
                1,
                &Device::Cpu,
            )
            .unwrap();
            let row = &one.confusion[usize::from(data.label(i))];
            row.iter().position(|&count| count == 1).unwrap()
        })
        .collect();

    let images: Vec<DynamicImage> = (0..n).map(|i| image_of(&data, i)).collect();
    let pngs: Vec<Vec<u8>> = images.iter().map(encode_png).collect();
    let served = classify_all(&server, &pngs, "image/png", 32).await;
    let differing: Vec<usize> = (0..n)
        .filter(|&i| served[i] != eval_predictions[i])
        .collect();
    assert!(
        differing.is_empty(),
        "PNG predictions differ from eval's at {differing:?}"
    );
    let correct = |predicted: &[usize], indices: &[usize]| {
        indices
            .iter()
            .filter(|&&i| predicted[i] == usize::from(data.label(i)))
            .count()
    };
    let all: Vec<usize> = (0..n).collect();
    let accuracy = correct(&served, &all) as f64 / n as f64;
    // The slice is 1,000 of the 10,000 test images: its accuracy lies
    // within a few standard errors (0.0075 each) of the full set's.
    let recorded = metadata
        .provenance
        .test_accuracy
        .expect("the shipped weights record their test accuracy");
    assert!(
        (accuracy - recorded).abs() <= 0.03,
        "served accuracy {accuracy:.4} on the slice; {recorded:.4} recorded on the full test set"
    );

    // JPEG loses detail, so a few borderline images may change class.
    let jpegs: Vec<Vec<u8>> = images.iter().map(|im| encode_jpeg(im, 95)).collect();
    let served_jpeg = classify_all(&server, &jpegs, "image/jpeg", 32).await;
    let agree = (0..n).filter(|&i| served_jpeg[i] == served[i]).count();
    assert!(
        agree as f64 >= 0.98 * n as f64,
        "JPEG q95 agrees with eval on only {agree} of {n}"
    );

    // Photo-like versions of the first 100 images the model gets right.
    let right: Vec<usize> = (0..n)
        .filter(|&i| served[i] == usize::from(data.label(i)))
        .take(100)
        .collect();
    let photos: Vec<Vec<u8>> = right
        .iter()
        .map(|&i| encode_jpeg(&photo_like(&images[i]), 90))
        .collect();
    let served_photo = classify_all(&server, &photos, "image/jpeg", 32).await;
    let photos_right = right
        .iter()
        .zip(&served_photo)
        .filter(|(&i, &p)| p == usize::from(data.label(i)))
        .count();
    eprintln!(
        "shipped weights on the {n}-image slice: accuracy {accuracy:.4}; JPEG agrees on \
         {agree}/{n}; photo-like versions right {photos_right}/{}",
        right.len()
    );
    assert!(
        photos_right * 10 >= right.len() * 9,
        "photo-like images right: only {photos_right} of {}",
        right.len()
    );

    // One photo, through the single-image route: the preprocessing report
    // says what was done to it.
    let photo = photos[0].clone();
    let response = server.post_image("", "image/jpeg", photo).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["preprocessing"]["inverted"], true, "{body}");
    assert_eq!(body["preprocessing"]["original_width"], 600, "{body}");
    assert_eq!(body["preprocessing"]["original_height"], 800, "{body}");
    server.shutdown().await.unwrap();
}

/// `--kernels generic`, the code a GPU serves with, gives the classes the
/// native kernels give on the committed slice (at least 999 of 1,000:
/// the two sum in different orders, so a borderline image may flip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_kernels_serve_the_classes_native_kernels_give() {
    let same = served_like_native_fp32(|c| c.kernels = Some(nin_model::Kernels::Generic)).await;
    assert!(same >= 999, "generic serves {same} of 1000 as native does");
}

/// `--precision bf16` serves the classes FP32 gives on the committed slice
/// but for a few borderline images (bf16 keeps 8 bits of each input).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_serves_the_classes_fp32_gives() {
    use nin_model::precision::{Bf16Units, Precision};
    if let (Precision::Fp32, Some(why)) = Precision::Bf16.resolve(Bf16Units::detect()) {
        eprintln!("skipped, bf16 serves as FP32 here: {why}");
        return;
    }
    let same = served_like_native_fp32(|c| c.precision = Precision::Bf16).await;
    assert!(same >= 990, "bf16 serves {same} of 1000 as FP32 does");
}

/// Serves the committed slice with the shipped weights as `configure`
/// says; returns how many images get the class the native FP32 kernels
/// give outside the server.
async fn served_like_native_fp32(configure: impl FnOnce(&mut Config)) -> usize {
    let weights = shipped_weights();
    let data = test_slice();
    let n = data.len();
    let (native, metadata) = nin_model::weights::load(&weights, &Device::Cpu).unwrap();
    let mut native_predictions = Vec::with_capacity(n);
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(100) {
        let (x, _) =
            nin_train::loader::batch(&data, chunk, &metadata.preprocessing, None, &Device::Cpu)
                .unwrap();
        let logits = candle_nn::ModuleT::forward_t(&native, &x, false).unwrap();
        let classes: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        native_predictions.extend(classes.into_iter().map(|c| c as usize));
    }

    let server = TestServer::start_with_weights(&weights, |c| {
        c.max_batch = 32;
        configure(c);
    })
    .await;
    let pngs: Vec<Vec<u8>> = (0..n).map(|i| encode_png(&image_of(&data, i))).collect();
    let served = classify_all(&server, &pngs, "image/png", 32).await;
    server.shutdown().await.unwrap();
    (0..n)
        .filter(|&i| served[i] == native_predictions[i])
        .count()
}
