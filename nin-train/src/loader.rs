//! Batches: data-set images through the shared preprocessing into tensors.
//!
//! Images stay as bytes until a batch is needed; each one is augmented (in
//! training) and then goes through [`nin_model::preprocess::preprocess`],
//! the same function the server calls, so a model never sees inputs
//! prepared differently from the ones it was trained on.
//!
//! A batch is made in two halves: [`prepare`] does the work on the host
//! (augmentation, preprocessing) and can run on any thread;
//! [`HostBatch::to_device`] builds the tensors on the thread that trains.
//! [`Prefetch`] runs the first half on a background thread, so the next
//! batch is ready when a training step ends.

use std::ops::Range;
use std::sync::mpsc::{self, Receiver};
use std::thread::{Scope, ScopedJoinHandle};

use candle_core::{Device, Tensor};
use nin_model::preprocess::{batch_tensor, gray_image, preprocess, Prepared, Preprocessing};
use rand_chacha::ChaCha8Rng;

use crate::augment::Augment;
use crate::data::Dataset;
use crate::{Error, Result};

/// The images at `indices` as a (N, 1, S, S) tensor and their labels as (N,) u32,
/// augmented when `augment` is given.
pub fn batch(
    dataset: &Dataset,
    indices: &[usize],
    preprocessing: &Preprocessing,
    augment: Option<(&Augment, &mut ChaCha8Rng)>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    prepare(dataset, indices, preprocessing, augment)?.to_device(device)
}

/// A batch made on the host, not yet on a device: what [`batch`] uploads.
#[derive(Clone, Debug)]
pub struct HostBatch {
    images: Vec<Prepared>,
    labels: Vec<u32>,
    size: usize,
}

/// The host half of [`batch`]: augments and preprocesses the images at
/// `indices`. Touches no device, so it can run on a background thread
/// (a GPU context belongs to the thread that trains).
pub fn prepare(
    dataset: &Dataset,
    indices: &[usize],
    preprocessing: &Preprocessing,
    mut augment: Option<(&Augment, &mut ChaCha8Rng)>,
) -> Result<HostBatch> {
    let (rows, cols) = (dataset.images.rows, dataset.images.cols);
    let images = indices
        .iter()
        .map(|&i| {
            let pixels = match augment.as_mut() {
                Some((augment, rng)) => augment.apply(dataset.image(i), cols, rows, rng),
                None => dataset.image(i).to_vec(),
            };
            preprocess(
                &gray_image(pixels, cols as u32, rows as u32)?,
                preprocessing,
            )
        })
        .collect::<nin_model::Result<Vec<_>>>()?;
    let labels = indices
        .iter()
        .map(|&i| u32::from(dataset.label(i)))
        .collect();
    Ok(HostBatch {
        images,
        labels,
        size: preprocessing.size,
    })
}

impl HostBatch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images as a (N, 1, S, S) tensor and the labels as (N,) u32 on
    /// `device`: one host-to-device copy each.
    pub fn to_device(self, device: &Device) -> Result<(Tensor, Tensor)> {
        let images = batch_tensor(&self.images, self.size, device)?;
        let n = self.labels.len();
        let labels = Tensor::from_vec(self.labels, n, device)?;
        Ok((images, labels))
    }
}

/// The results of `produce(i)` for each `i` of a range, in order, computed
/// on a background thread up to `ahead + 1` items before the consumer asks.
///
/// A bounded channel ([`mpsc::sync_channel`]) holds the finished items, so
/// memory stays bounded however slow the consumer is. Dropping the
/// iterator stops the thread (its next send fails) and waits for it; a
/// panic in `produce` is re-raised in the consumer. Each item must not
/// depend on the ones before it being consumed (training batches take
/// their random stream from (seed, epoch, batch), not from a shared
/// generator), so the items are exactly those a plain loop would make.
pub struct Prefetch<'scope, T> {
    receiver: Option<Receiver<T>>,
    thread: Option<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope, T: Send + 'scope> Prefetch<'scope, T> {
    /// Starts the thread `nin-prefetch` in `scope`.
    pub fn spawn<'env, F>(
        scope: &'scope Scope<'scope, 'env>,
        range: Range<usize>,
        ahead: usize,
        mut produce: F,
    ) -> Result<Self>
    where
        F: FnMut(usize) -> T + Send + 'scope,
    {
        let (sender, receiver) = mpsc::sync_channel(ahead);
        let thread = std::thread::Builder::new()
            .name("nin-prefetch".into())
            .spawn_scoped(scope, move || {
                for i in range {
                    if sender.send(produce(i)).is_err() {
                        // The consumer is gone: stop early.
                        break;
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Self {
            receiver: Some(receiver),
            thread: Some(thread),
        })
    }
}

impl<'scope, T: Send + 'scope> Iterator for Prefetch<'scope, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        let item = self.receiver.as_ref()?.recv().ok();
        if item.is_none() {
            // The range is done, or `produce` panicked: join to tell which.
            self.receiver = None;
            self.join();
        }
        item
    }
}

impl<T> Prefetch<'_, T> {
    /// Waits for the thread; re-raises its panic unless this thread is
    /// already unwinding.
    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

impl<T> Drop for Prefetch<'_, T> {
    fn drop(&mut self) {
        // Dropping the receiver first makes the thread's next send fail,
        // so the join cannot wait on a full channel.
        self.receiver = None;
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_yields_every_item_in_order() {
        let got: Vec<usize> = std::thread::scope(|scope| {
            Prefetch::spawn(scope, 3..40, 1, |i| i * i)
                .unwrap()
                .collect()
        });
        assert_eq!(got, (3..40).map(|i| i * i).collect::<Vec<_>>());
    }

    #[test]
    fn dropping_a_prefetch_early_stops_its_thread() {
        // An endless range: only the drop can end the thread, and the
        // scope would hang if it did not.
        std::thread::scope(|scope| {
            let mut items = Prefetch::spawn(scope, 0..usize::MAX, 2, |i| i).unwrap();
            assert_eq!(items.next(), Some(0));
            assert_eq!(items.next(), Some(1));
        });
    }

    #[test]
    #[should_panic(expected = "producer failed at 2")]
    fn a_panic_while_producing_reaches_the_consumer() {
        std::thread::scope(|scope| {
            let items = Prefetch::spawn(scope, 0..5, 1, |i| {
                assert!(i != 2, "producer failed at {i}");
                i
            })
            .unwrap();
            let _ = items.count();
        });
    }
}
