//! What every accepted inference request must give, whichever protocol
//! carried it: shared by the `v2_request` and `grpc_infer` targets.

use nin_model::preprocess::Preprocessing;
use nin_serve::tensor::OUTPUTS;

/// The shipped model's input: 1 channel, 28x28.
pub const CHANNELS: usize = 1;
pub const SIZE: usize = 28;
/// Small, so that the limit is met often.
pub const MAX_IMAGES: usize = 4;

/// `n` images (1..=[`MAX_IMAGES`], the shape's N), each `CHANNELS * SIZE *
/// SIZE` finite values within the normalised range of grey levels 0..=255,
/// and one or two outputs, each a model output named once.
pub fn check(recipe: &Preprocessing, n: usize, images: &[Vec<f32>], outputs: &[&str]) {
    assert!((1..=MAX_IMAGES).contains(&n), "N = {n}");
    assert_eq!(images.len(), n);
    let low = (0.0 - recipe.mean) / recipe.std;
    let high = (255.0 * recipe.scale - recipe.mean) / recipe.std;
    for image in images {
        assert_eq!(image.len(), CHANNELS * SIZE * SIZE);
        for &v in image {
            assert!(v.is_finite(), "{v}");
            assert!((low - 1e-4..=high + 1e-4).contains(&v), "{v}");
        }
    }
    assert!(!outputs.is_empty() && outputs.len() <= 2);
    assert!(outputs.iter().all(|name| OUTPUTS.contains(name)));
    assert!(outputs.len() == 1 || outputs[0] != outputs[1]);
}
