//! Bad query values, unknown model names, routes and methods.

use super::*;

/// Bad `top_k` and `explain` values; the query is checked after the
/// content type and the body are read, before any decoding.
pub(crate) fn queries(c: &mut Corpus) {
    const BAD: [&str; 28] = [
        "top_k=0",
        "top_k=-1",
        "top_k=abc",
        "top_k=11",
        "top_k=1e3",
        "top_k=3.0",
        "top_k=",
        "top_k=99999999999999999999999",
        "top_k=18446744073709551616",
        "top_k=%203",
        "top_k=3&top_k=4",
        "top_k=0x3",
        "top_k=%00",
        "top_k=%FF",
        "top_k=%D9%A1",
        "top_k=%zz",
        "top_k=1000000",
        "top_k=-0",
        "explain=maybe",
        "explain=1",
        "explain=0",
        "explain=yes",
        "explain=TRUE",
        "explain=True",
        "explain=",
        "explain=true&explain=false",
        "top_k=10&explain=nope",
        "top_k=3&explain=true&top_k=3",
    ];
    let image = c.good_png.clone();
    let noise = c.rng.bytes(200);
    let ct = form_type();
    let good_form = form(&[("image", &image[..])]);
    for query in BAD {
        let path = format!("/classify?{query}");
        let sends: [(&str, Option<&str>, Vec<u8>); 4] = [
            ("a good PNG", Some("image/png"), image.clone()),
            ("an empty body", None, Vec::new()),
            ("noise", Some("application/octet-stream"), noise.clone()),
            ("a good form", Some(&ct), good_form.clone()),
        ];
        for (what, content_type, body) in sends {
            c.post(
                "bad query",
                format!("?{query} with {what}"),
                &path,
                content_type,
                body,
                Expect::Error(INVALID_PARAMETER),
            );
        }
    }
}

/// Unknown model names on every v2 model route, unknown routes, wrong methods.
pub(crate) fn models_and_routes(c: &mut Corpus) {
    let good = c.good_v2.clone().into_bytes();
    let long = "n".repeat(5000);
    let names = [
        "resnet",
        "NIN",
        "Nin",
        "nin%20",
        "%20nin",
        "nin%00",
        "nin.",
        "nin-",
        "n%C3%ADn",
        "nin%2Finfer",
        "nin%2F..%2Fnin",
        "%F0%9F%91%9F",
        "0",
        "null",
        "nin;v=1",
        "nin%3Fx=1",
        "nin%0D%0AX-Injected:%201",
        &long,
    ];
    for name in names {
        let short: String = name.chars().take(24).collect();
        let family = "unknown model";
        c.post(
            family,
            format!("infer on {short}"),
            &format!("/v2/models/{name}/infer"),
            Some("application/json"),
            good.clone(),
            Expect::V2Error(404),
        );
        // The model is checked before the body is read.
        c.post(
            family,
            format!("garbage infer on {short}"),
            &format!("/v2/models/{name}/infer"),
            Some("application/json"),
            b"{not json".to_vec(),
            Expect::V2Error(404),
        );
        for route in ["", "/ready", "/config", "/stats"] {
            c.http(
                family,
                format!("GET {short}{route}"),
                Method::GET,
                &format!("/v2/models/{name}{route}"),
                None,
                Vec::new(),
                Expect::V2Error(404),
            );
        }
    }
    // The one version is `1`: any other is unknown too.
    for version in ["2", "0", "latest", "1.0"] {
        c.post(
            "unknown model",
            format!("infer on version {version}"),
            &format!("/v2/models/nin/versions/{version}/infer"),
            Some("application/json"),
            good.clone(),
            Expect::V2Error(404),
        );
        c.http(
            "unknown model",
            format!("GET config of version {version}"),
            Method::GET,
            &format!("/v2/models/nin/versions/{version}/config"),
            None,
            Vec::new(),
            Expect::V2Error(404),
        );
    }
    c.post(
        "unknown model",
        "infer on the empty name".into(),
        "/v2/models//infer",
        Some("application/json"),
        good.clone(),
        Expect::V2Error(404),
    );
    // A name that is not UTF-8 cannot be decoded at all: 400.
    for route in ["", "/ready", "/infer"] {
        let method = if route == "/infer" {
            Method::POST
        } else {
            Method::GET
        };
        c.http(
            "unknown model",
            format!("invalid UTF-8 name{route}"),
            method,
            &format!("/v2/models/nin%FF{route}"),
            Some(&b"application/json"[..]),
            good.clone(),
            Expect::V2Error(400),
        );
    }

    let family = "unknown route or method";
    for (method, path, errors) in [
        (Method::GET, "/classify", METHOD_NOT_ALLOWED),
        (Method::PUT, "/classify", METHOD_NOT_ALLOWED),
        (Method::DELETE, "/classify", METHOD_NOT_ALLOWED),
        (Method::PATCH, "/classify", METHOD_NOT_ALLOWED),
        (Method::GET, "/v2/models/nin/infer", METHOD_NOT_ALLOWED),
        (Method::PUT, "/v2/models/nin/infer", METHOD_NOT_ALLOWED),
        (Method::POST, "/v2/models/nin", METHOD_NOT_ALLOWED),
        (Method::POST, "/healthz", METHOD_NOT_ALLOWED),
        (Method::POST, "/readyz", METHOD_NOT_ALLOWED),
        (Method::POST, "/v2", METHOD_NOT_ALLOWED),
        (Method::DELETE, "/v2/health/live", METHOD_NOT_ALLOWED),
        (Method::GET, "/nope", NOT_FOUND),
        (Method::POST, "/classify/", NOT_FOUND),
        (Method::POST, "/CLASSIFY", NOT_FOUND),
        (Method::POST, "/classify%00", NOT_FOUND),
        (Method::POST, "/classify/extra", NOT_FOUND),
        (
            Method::POST,
            "/v2/models/nin/versions/1/infer/extra",
            NOT_FOUND,
        ),
        (Method::POST, "/v2/models/nin/versions", NOT_FOUND),
        (Method::POST, "/v2/models/nin/config", METHOD_NOT_ALLOWED),
        (
            Method::PUT,
            "/v2/models/nin/versions/1/infer",
            METHOD_NOT_ALLOWED,
        ),
        (Method::POST, "/v2/models/nin/infer/", NOT_FOUND),
        (Method::GET, "/v3", NOT_FOUND),
        (Method::GET, "/v2/models", NOT_FOUND),
        (Method::GET, "/%FF", NOT_FOUND),
    ] {
        let name = format!("{method} {path}");
        c.http(
            family,
            name,
            method,
            path,
            Some(&b"image/png"[..]),
            c.good_png.clone(),
            Expect::Error(errors),
        );
    }
}
