//! gRPC `ModelInfer` message bytes -> prost's decoding ->
//! `nin_serve::grpc::check_infer`: everything the service does to a
//! request before the model, without a socket and without the model.
//!
//! Never panics, and:
//! - a refusal is a client error (`INVALID_ARGUMENT` or 413/422 in HTTP
//!   terms), never a server fault;
//! - an accepted request gives as many images as its shape's `N`
//!   (1..=the limit), each `channels * size * size` finite values within
//!   the normalised range of grey levels 0..=255, and at least one
//!   output, each named once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nin_model::preprocess::Preprocessing;
use nin_serve::grpc::check_infer;
use nin_serve::grpc::proto::ModelInferRequest;
use prost::Message;

mod accepted;
use accepted::{CHANNELS, MAX_IMAGES, SIZE};

fuzz_target!(|message: &[u8]| {
    let Ok(request) = ModelInferRequest::decode(message) else {
        return; // tonic answers INTERNAL for undecodable messages itself
    };
    let recipe = Preprocessing::fashion_mnist(SIZE);
    let checked = match check_infer(&request, &recipe, CHANNELS, MAX_IMAGES) {
        Ok(checked) => checked,
        Err(e) => {
            assert!(
                e.status().is_client_error(),
                "a server fault for a bad request: {e:?}"
            );
            assert_eq!(e.grpc_code(), tonic::Code::InvalidArgument, "{e:?}");
            return;
        }
    };

    let n = request.inputs[0].shape[0] as usize;
    accepted::check(&recipe, n, &checked.images, &checked.outputs);
});
