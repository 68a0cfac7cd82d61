//! The memory request bodies may hold at once, reserved before a body is
//! read.
//!
//! `--max-body-bytes` bounds one body; the queue (`--queue-size`) bounds
//! the images admitted to the model. Neither bounds the bodies being read:
//! a body is read, and parsed, before its images can be counted and
//! admitted. Without a bound of their own, 128 clients each sending 8 MiB
//! drove the server to about 1 GiB. So every route that reads a body first
//! reserves what that body will cost at its peak ([`BodyKind`]) from one
//! budget (`--max-body-memory`), without waiting: when the budget is spent
//! the request is answered 503 `overloaded` with `Retry-After`, before a
//! byte of it is read.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Error;

/// How a route holds a body: what it costs in memory, per byte, at peak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// An image sent as the body: the bytes, decoded one at a time after
    /// admission.
    Raw,
    /// A multipart form: the bytes, and the fields multer copies out.
    Multipart,
    /// A v2 JSON request: the bytes, its numbers as f64 (at most 4 bytes
    /// per byte of text, see [`crate::v2::Numbers`]) and the same as f32
    /// model inputs (2 more).
    V2Json,
    /// A gRPC ModelInfer message, counted once decoded: its encoded bytes,
    /// prost's copy of the raw tensors, and the f32 model inputs (4 bytes
    /// per UINT8 byte).
    Grpc,
}

impl BodyKind {
    /// Bytes of memory per byte of body, at peak.
    fn cost(self) -> usize {
        match self {
            BodyKind::Raw => 1,
            BodyKind::Multipart => 2,
            BodyKind::V2Json => 7,
            BodyKind::Grpc => 6,
        }
    }
}

/// The budget: `total` bytes shared by every body in flight.
#[derive(Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// Memory reserved for one body; given back when dropped, which a handler
/// does when it answers (the body and what was parsed from it are gone).
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Bytes reserved by the bodies in flight now.
    pub fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    /// Reserves what a body of the declared `Content-Length` (or `limit`
    /// when none is declared) costs as `kind`, capped at the whole budget
    /// so that the largest body the server takes can always be served
    /// alone. [`Error::BodyMemoryFull`] when the budget cannot cover it now.
    pub fn reserve(
        &self,
        headers: &HeaderMap,
        limit: usize,
        kind: BodyKind,
    ) -> Result<Reservation, Error> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(limit, |length| length.min(limit));
        self.reserve_len(declared, kind)
    }

    /// Reserves what a body of `length` bytes costs as `kind`, capped at
    /// the whole budget; see [`BodyBudget::reserve`].
    pub fn reserve_len(&self, length: usize, kind: BodyKind) -> Result<Reservation, Error> {
        let cost = length.saturating_mul(kind.cost()).min(self.total);
        if cost == 0 {
            return Ok(Reservation { _permit: None });
        }
        let permits = u32::try_from(cost).unwrap_or(u32::MAX);
        self.bytes
            .clone()
            .try_acquire_many_owned(permits)
            .map(|permit| Reservation {
                _permit: Some(permit),
            })
            .map_err(|_| Error::BodyMemoryFull(self.total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn length(n: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, n.to_string().parse().unwrap());
        headers
    }

    #[test]
    fn bodies_are_admitted_while_their_cost_fits_and_give_it_back() {
        let budget = BodyBudget::new(1000);
        let a = budget.reserve(&length(400), 500, BodyKind::Raw).unwrap();
        let b = budget
            .reserve(&length(250), 500, BodyKind::Multipart)
            .unwrap();
        // 400 + 500 spent: 100 left.
        let refused = budget
            .reserve(&length(101), 500, BodyKind::Raw)
            .unwrap_err();
        assert!(
            matches!(refused, Error::BodyMemoryFull(1000)),
            "{refused:?}"
        );
        assert!(budget.reserve(&length(100), 500, BodyKind::Raw).is_ok());
        drop((a, b));
        assert_eq!(budget.in_use(), 0);
        assert!(budget.reserve(&length(100), 500, BodyKind::V2Json).is_ok());
    }

    #[test]
    fn an_undeclared_length_costs_the_limit_and_the_largest_body_fits_alone() {
        let budget = BodyBudget::new(1000);
        // Chunked: as much as the limit allows.
        let chunked = budget
            .reserve(&HeaderMap::new(), 600, BodyKind::Raw)
            .unwrap();
        assert!(budget.reserve(&length(401), 600, BodyKind::Raw).is_err());
        drop(chunked);
        // 7 x 600 is more than the budget: the whole budget, not a refusal.
        let big = budget.reserve(&length(600), 600, BodyKind::V2Json).unwrap();
        assert!(budget.reserve(&length(1), 600, BodyKind::Raw).is_err());
        drop(big);
        // A declared length above the limit reserves the limit (it is
        // refused with 413 anyway).
        assert!(budget.reserve(&length(10_000), 600, BodyKind::Raw).is_ok());
    }
}
