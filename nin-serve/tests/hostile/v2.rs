//! v2 inference requests: wrong tensors, values and JSON.

use super::*;

/// A v2 inference request with one input tensor.
pub(crate) fn v2_request(shape: Value, datatype: &str, data: Value) -> String {
    json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]})
        .to_string()
}

/// v2 tensors of the wrong shape, datatype, length or values.
pub(crate) fn v2_tensors(c: &mut Corpus) {
    let half = |n: usize| json!(vec![0.5; n]);
    let zeros = |n: usize| json!(vec![0; n]);

    let family = "v2 wrong shape";
    let shapes = [
        json!([]),
        json!([1]),
        json!([784]),
        json!([1, 784]),
        json!([1, 28, 28]),
        json!([28, 28]),
        json!([1, 1, 28, 28, 1]),
        json!([1, 1, 1, 28, 28]),
        json!([1, 3, 28, 28]),
        json!([1, 0, 28, 28]),
        json!([1, 1, 28, 27]),
        json!([1, 1, 27, 28]),
        json!([1, 1, 56, 14]),
        json!([1, 1, 14, 56]),
        json!([1, 1, 0, 0]),
        json!([0, 1, 28, 28]),
        json!([-1, 1, 28, 28]),
        json!([1, -1, 28, 28]),
        json!([1, 1, -28, -28]),
        json!([i64::MIN, 1, 28, 28]),
        json!([1, 1, i64::MAX, i64::MAX]),
        json!([1, 1, 4_294_967_324_i64, 28]),
    ];
    for shape in shapes {
        for (datatype, data) in [("FP32", half(784)), ("UINT8", zeros(784))] {
            let name = format!("{datatype} shape {shape}");
            c.v2(family, name, v2_request(shape.clone(), datatype, data), 422);
        }
    }
    for (what, shape) in [
        ("floats", json!([1.0, 1.0, 28.0, 28.0])),
        ("strings", json!(["1", "1", "28", "28"])),
        ("a string", json!("1,1,28,28")),
        ("null", json!(null)),
        ("an object", json!({"n": 1})),
        ("nested", json!([[1, 1, 28, 28]])),
        ("booleans", json!([true, true, 28, 28])),
        ("1e30", json!([1e30, 1, 28, 28])),
    ] {
        c.v2(
            family,
            format!("shape as {what}"),
            v2_request(shape, "FP32", half(784)),
            422,
        );
    }
    let huge_n = v2_request(json!([1, 1, 28, 28]), "FP32", half(784)).replacen(
        "[1,1,28,28]",
        "[99999999999999999999999,1,28,28]",
        1,
    );
    c.v2(family, "N beyond i64".into(), huge_n, 422);
    // More images than one request may hold: 413, before the data is read.
    for n in [MAX_BATCH as i64 + 1, 1000, i64::MAX] {
        let shape = json!([n, 1, 28, 28]);
        c.v2(
            "v2 too many images",
            format!("shape {shape}"),
            v2_request(shape, "UINT8", zeros(784)),
            413,
        );
    }

    let family = "v2 wrong datatype";
    for datatype in [
        "FP64",
        "FP16",
        "BF16",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT16",
        "UINT32",
        "UINT64",
        "BOOL",
        "BYTES",
        "fp32",
        "uint8",
        "Fp32",
        "",
        " FP32",
        "FP32 ",
        "UINT8\u{0}",
        "FP32\n",
        "F\u{0130}32",
    ] {
        c.v2(
            family,
            format!("datatype {datatype:?}"),
            v2_request(json!([1, 1, 28, 28]), datatype, zeros(784)),
            422,
        );
    }
    for (what, datatype) in [
        ("null", json!(null)),
        ("a number", json!(32)),
        ("a list", json!(["FP32"])),
    ] {
        let mut body: Value = serde_json::from_str(&c.good_v2).unwrap();
        body["inputs"][0]["datatype"] = datatype;
        c.v2(family, format!("datatype as {what}"), body.to_string(), 422);
    }

    let family = "v2 wrong length";
    for datatype in ["FP32", "UINT8"] {
        for n in [0, 1, 27, 28, 783, 785, 1568, 784 * MAX_BATCH + 1, 15_000] {
            let data = if datatype == "FP32" {
                half(n)
            } else {
                zeros(n)
            };
            c.v2(
                family,
                format!("{datatype} [1,1,28,28] with {n} values"),
                v2_request(json!([1, 1, 28, 28]), datatype, data),
                422,
            );
        }
        let data = if datatype == "FP32" {
            half(784)
        } else {
            zeros(784)
        };
        c.v2(
            family,
            format!("{datatype} [2,1,28,28] with 784 values"),
            v2_request(json!([2, 1, 28, 28]), datatype, data),
            422,
        );
        for (what, data) in [
            ("a scalar", json!(0)),
            ("an empty list", json!([])),
            ("empty lists", json!([[], [[]]])),
            ("null", json!(null)),
            ("an object", json!({"0": 0})),
            ("a string", json!("0,0,0")),
            ("booleans", json!(vec![false; 784])),
            ("784 nulls", json!(vec![Value::Null; 784])),
            ("numeric strings", json!(vec!["0"; 784])),
            ("one string among numbers", {
                let mut v = vec![json!(0); 784];
                v[400] = json!("x");
                Value::Array(v)
            }),
            ("one object among numbers", {
                let mut v = vec![json!(0); 784];
                v[783] = json!({});
                Value::Array(v)
            }),
        ] {
            c.v2(
                family,
                format!("{datatype} data as {what}"),
                v2_request(json!([1, 1, 28, 28]), datatype, data),
                422,
            );
        }
    }

    let family = "v2 NaN and infinity";
    let base = v2_request(json!([1, 1, 28, 28]), "FP32", half(784));
    let uint8 = v2_request(json!([1, 1, 28, 28]), "UINT8", zeros(784));
    for literal in [
        "NaN", "-NaN", "Infinity", "-Infinity", "\"NaN\"", "\"nan\"", "\"inf\"", "\"-inf\"", "\"Infinity\"",
        "\"-Infinity\"", "\"INF\"", "1e999", "-1e999", "1e309", "1.8e308", "-2e308",
        "1000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    ] {
        for position in [0, 391, 783] {
            // Replace the value at `position` of the flat FP32 data.
            let mut values = vec!["0.5"; 784];
            values[position] = literal;
            let body = base.replacen(&format!("[{}]", vec!["0.5"; 784].join(",")), &format!("[{}]", values.join(",")), 1);
            assert_ne!(body, base);
            let short: String = literal.chars().take(12).collect();
            c.v2(family, format!("FP32 {short} at {position}"), body, 422);
        }
        let body = uint8.replacen("[0,", &format!("[{literal},"), 1);
        let short: String = literal.chars().take(12).collect();
        c.v2(family, format!("UINT8 {short} first"), body, 422);
    }
    // Not JSON and not Python's spelling: malformed JSON, 400.
    for literal in ["nan", "inf", "-inf", "Inf", "NAN", "infinity", "+Infinity"] {
        let body = base.replacen("0.5", literal, 1);
        let status = if literal == "+Infinity" { 422 } else { 400 };
        c.v2(family, format!("bare {literal}"), body, status);
    }

    let family = "v2 out of range";
    for (datatype, value) in [
        ("FP32", "-0.0001"),
        ("FP32", "1.0000001"),
        ("FP32", "2"),
        ("FP32", "-1"),
        ("FP32", "255"),
        ("FP32", "1e10"),
        ("FP32", "-1e-300"),
        ("FP32", "3.5e38"),
        ("UINT8", "-1"),
        ("UINT8", "256"),
        ("UINT8", "0.5"),
        ("UINT8", "255.5"),
        ("UINT8", "1e3"),
        ("UINT8", "-0.1"),
        ("UINT8", "18446744073709551616"),
        ("UINT8", "-9223372036854775809"),
    ] {
        let body = if datatype == "FP32" { &base } else { &uint8 };
        let from = if datatype == "FP32" { "[0.5," } else { "[0," };
        for position in ["first", "last"] {
            let changed = if position == "first" {
                body.replacen(from, &format!("[{value},"), 1)
            } else {
                let tail = if datatype == "FP32" { ",0.5]" } else { ",0]" };
                body.replacen(tail, &format!(",{value}]"), 1)
            };
            assert_ne!(&changed, body);
            c.v2(
                family,
                format!("{datatype} {value} {position}"),
                changed,
                422,
            );
        }
    }
}

/// Malformed, deeply nested, enormous and odd v2 JSON.
pub(crate) fn v2_json(c: &mut Corpus) {
    let good = c.good_v2.clone();
    let family = "v2 malformed JSON";
    for (what, body) in [
        ("not JSON", "hello".to_string()),
        ("an open brace", "{".to_string()),
        ("an open list", "{\"inputs\": [".to_string()),
        ("trailing garbage", format!("{good} xyz")),
        ("two objects", format!("{good}{good}")),
        ("a byte-order mark", format!("\u{feff}{good}")),
        ("single quotes", good.replace('"', "'")),
        ("a comment", format!("/* hi */{good}")),
        ("a trailing comma", good.replacen("]}]}", "],}]}", 1)),
        ("unquoted keys", good.replace("\"inputs\"", "inputs")),
        (
            "a lone surrogate",
            good.replacen("\"input\"", "\"\\ud800\"", 1),
        ),
        ("a bad escape", good.replacen("\"input\"", "\"\\x41\"", 1)),
        (
            "a raw control character",
            good.replacen("\"input\"", "\"in\u{1}put\"", 1),
        ),
        (
            "a leading zero",
            good.replacen("[1,1,28,28]", "[01,1,28,28]", 1),
        ),
        (
            "a hex number",
            good.replacen("[1,1,28,28]", "[0x1,1,28,28]", 1),
        ),
        (
            "a leading plus",
            good.replacen("[1,1,28,28]", "[+1,1,28,28]", 1),
        ),
        (
            "a bare dot",
            good.replacen("[1,1,28,28]", "[1.,1,28,28]", 1),
        ),
        ("20 KB of brackets", "[".repeat(20_000)),
        ("whitespace only", " \r\n\t".repeat(1000)),
    ] {
        c.v2(family, what.into(), body, 400);
    }
    let mut invalid_utf8 = good.clone().into_bytes();
    let at = invalid_utf8
        .windows(7)
        .position(|w| w == b"\"input\"")
        .unwrap();
    invalid_utf8[at + 1] = 0xff;
    c.post(
        family,
        "invalid UTF-8 in a string".into(),
        "/v2/models/nin/infer",
        Some("application/json"),
        invalid_utf8,
        Expect::V2Error(400),
    );
    let len = good.len();
    let mut cuts: Vec<usize> = (0..25).map(|_| 1 + c.rng.below(len - 2)).collect();
    cuts.extend([1, 2, len / 2, len - 2, len - 1]);
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts {
        c.v2(
            family,
            format!("truncated to {cut} of {len} bytes"),
            good[..cut].to_string(),
            400,
        );
    }

    let family = "v2 wrong form";
    let with = |what: &str, edit: &dyn Fn(&mut Value)| {
        let mut body: Value = serde_json::from_str(&good).unwrap();
        edit(&mut body);
        (what.to_string(), body.to_string())
    };
    let cases = vec![
        with("inputs null", &|b| b["inputs"] = Value::Null),
        with("inputs an object", &|b| b["inputs"] = json!({})),
        with("inputs [null]", &|b| b["inputs"] = json!([null])),
        with("inputs [{}]", &|b| b["inputs"] = json!([{}])),
        with("no inputs", &|b| b["inputs"] = json!([])),
        with("two inputs", &|b| {
            let input = b["inputs"][0].clone();
            b["inputs"] = json!([input.clone(), input]);
        }),
        with("input name INPUT", &|b| {
            b["inputs"][0]["name"] = json!("INPUT")
        }),
        with("input name empty", &|b| b["inputs"][0]["name"] = json!("")),
        with("input name a number", &|b| {
            b["inputs"][0]["name"] = json!(0)
        }),
        with("no name", &|b| {
            b["inputs"][0].as_object_mut().unwrap().remove("name");
        }),
        with("no shape", &|b| {
            b["inputs"][0].as_object_mut().unwrap().remove("shape");
        }),
        with("no datatype", &|b| {
            b["inputs"][0].as_object_mut().unwrap().remove("datatype");
        }),
        with("no data", &|b| {
            b["inputs"][0].as_object_mut().unwrap().remove("data");
        }),
        with("unknown output", &|b| {
            b["outputs"] = json!([{"name": "features"}])
        }),
        with("outputs a string", &|b| b["outputs"] = json!("logits")),
        with("outputs [{}]", &|b| b["outputs"] = json!([{}])),
        with("3000 unknown outputs", &|b| {
            b["outputs"] = json!(vec![json!({"name": "x"}); 3000])
        }),
        with("id a number", &|b| b["id"] = json!(42)),
        with("id an object", &|b| b["id"] = json!({})),
        with("the body a list", &|b| *b = json!([b.clone()])),
        with("the body null", &|b| *b = Value::Null),
        with("the body a string", &|b| *b = json!("inputs")),
        with("the body a number", &|b| *b = json!(1)),
        with("the body an empty object", &|b| *b = json!({})),
        with("500 inputs", &|b| {
            let input =
                json!({"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0]});
            b["inputs"] = json!(vec![input; 500]);
        }),
    ];
    for (what, body) in cases {
        c.v2(family, what, body, 422);
    }
    let duplicate = good.replacen("{\"inputs\":", "{\"inputs\":[],\"inputs\":", 1);
    assert_ne!(duplicate, good);
    c.v2(family, "a duplicate key".into(), duplicate, 422);

    let family = "v2 nested or enormous JSON";
    for depth in [10_000, 30_000] {
        let data = format!("{}0.5{}", "[".repeat(depth), "]".repeat(depth));
        let body = format!(
            "{{\"inputs\":[{{\"name\":\"input\",\"shape\":[1,1,28,28],\"datatype\":\"FP32\",\"data\":{data}}}]}}"
        );
        c.v2(family, format!("data nested {depth} deep"), body, 400);
        // Valid JSON: serde_json skips the unknown key iteratively (no
        // recursion limit needed) and finds no `inputs`.
        let objects = format!("{}1{}", "{\"a\":".repeat(depth / 3), "}".repeat(depth / 3));
        c.v2(
            family,
            format!("objects nested {} deep", depth / 3),
            objects,
            422,
        );
        let parameters = good.replacen(
            "{\"inputs\":",
            &format!(
                "{{\"parameters\":{}1{},\"inputs\":",
                "[".repeat(depth),
                "]".repeat(depth)
            ),
            1,
        );
        // JSON, but `parameters` must be an object: the typed parameters
        // refuse the first `[` without descending.
        c.v2(
            family,
            format!("parameters nested {depth} deep"),
            parameters,
            422,
        );
    }
    // Under serde_json's recursion limit: parsed, then the wrong length.
    for depth in [50, 120] {
        let data = format!("{}0.5{}", "[".repeat(depth), "]".repeat(depth));
        let body = v2_request(json!([1, 1, 28, 28]), "FP32", json!(0)).replacen(
            ":0}",
            &format!(":{data}}}"),
            1,
        );
        c.v2(family, format!("one value nested {depth} deep"), body, 422);
    }
    let long_id = {
        let mut body: Value = serde_json::from_str(&good).unwrap();
        body["id"] = json!("x".repeat(MAX_BODY_BYTES - good.len() - 100));
        body["inputs"][0]["shape"] = json!([1, 1, 28, 29]);
        body.to_string()
    };
    c.v2(family, "a 60 KB id and a wrong shape".into(), long_id, 422);
    let many_keys = {
        let mut body: Value = serde_json::from_str(&good).unwrap();
        let keys: serde_json::Map<String, Value> =
            (0..4000).map(|i| (format!("k{i}"), json!(i))).collect();
        body["parameters"] = Value::Object(keys);
        body["inputs"][0]["datatype"] = json!("FP64");
        body.to_string()
    };
    c.v2(
        family,
        "4000 parameters and a wrong datatype".into(),
        many_keys,
        422,
    );
    let long_number = good.replacen(
        "[1,1,28,28]",
        &format!("[1,1,28,28{}]", ",".to_string() + &"9".repeat(30_000)),
        1,
    );
    c.v2(family, "a 30000-digit dimension".into(), long_number, 422);
    let long_float = good.replacen(
        "[1,1,28,28]",
        &format!("[1,1,28,0.{}]", "0".repeat(30_000)),
        1,
    );
    c.v2(
        family,
        "a 30000-digit fraction as a dimension".into(),
        long_float,
        422,
    );
    let over = format!("{{\"inputs\":[{{\"name\":\"input\",\"shape\":[1,1,28,28],\"datatype\":\"FP32\",\"data\":[{}0]}}]}}", "0,".repeat(MAX_BODY_BYTES / 2));
    c.v2(
        family,
        "200000 values, over the body limit".into(),
        over,
        413,
    );
    let deep_over = format!(
        "{}0{}",
        "[".repeat(MAX_BODY_BYTES),
        "]".repeat(MAX_BODY_BYTES)
    );
    c.v2(family, "nesting over the body limit".into(), deep_over, 413);

    // Bit flips of a good request: a flipped digit can leave it valid.
    c.push(
        "control",
        "a good v2 request".into(),
        Request::Http {
            method: Method::POST,
            path: "/v2/models/nin/infer".into(),
            content_type: Some(b"application/json".to_vec()),
            body: good.clone().into_bytes(),
        },
        Expect::V2Ok,
    );
    for i in 0..40 {
        let mut body = good.clone().into_bytes();
        // Half in the first 100 bytes: the keys, the shape, the datatype.
        let span = if i % 2 == 0 { 100 } else { body.len() };
        let (at, bit) = (c.rng.below(span), c.rng.below(8));
        body[at] ^= 1 << bit;
        c.post(
            "v2 bit-flipped request",
            format!("bit {at}.{bit} flipped"),
            "/v2/models/nin/infer",
            Some("application/json"),
            body,
            Expect::V2Damaged,
        );
    }
}
