//! Replaying the corpus against the server, [`CONCURRENCY`] requests at
//! a time, and what a request and its answer are.

use super::*;

/// One request of the corpus and what may answer it.
pub(crate) struct Case {
    /// Group in the summary.
    pub(crate) family: &'static str,
    /// What exactly was sent, for failure messages.
    pub(crate) name: String,
    pub(crate) request: Request,
    pub(crate) expect: Expect,
}

pub(crate) enum Request {
    /// Sent with reqwest.
    Http {
        method: Method,
        /// Path and query.
        path: String,
        /// Raw header bytes, so non-UTF-8 values can be sent; none: no header.
        content_type: Option<Vec<u8>>,
        body: Vec<u8>,
    },
    /// Written as is on a fresh TCP connection: chunked bodies (reqwest
    /// sends them only with its `stream` feature), and heads announcing a
    /// body with `Expect: 100-continue`.
    Raw(Vec<u8>),
}

/// What the server answered.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn describe(&self, problem: &str) -> String {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = body.chars().take(300).collect();
        format!("{problem} (got {} {body})", self.status)
    }
}

/// Sends every case, `CONCURRENCY` at a time, and returns the answers in
/// the order of `cases`; a transport failure (reset, hang) is an `Err`.
pub(crate) async fn replay(
    server: &TestServer,
    cases: Arc<Vec<Case>>,
) -> Vec<Result<Answer, String>> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (client, cases, next) = (client.clone(), Arc::clone(&cases), Arc::clone(&next));
        let base = server.base.clone();
        workers.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else {
                    return answers;
                };
                answers.push((i, send(&client, &base, &case.request).await));
            }
        });
    }
    let mut answers: Vec<Option<Result<Answer, String>>> = cases.iter().map(|_| None).collect();
    while let Some(done) = workers.join_next().await {
        for (i, answer) in done.unwrap() {
            answers[i] = Some(answer);
        }
    }
    answers.into_iter().map(Option::unwrap).collect()
}

pub(crate) async fn send(
    client: &reqwest::Client,
    base: &str,
    request: &Request,
) -> Result<Answer, String> {
    match request {
        Request::Http {
            method,
            path,
            content_type,
            body,
        } => {
            let mut builder = client
                .request(method.clone(), format!("{base}{path}"))
                .body(body.clone());
            if let Some(value) = content_type {
                builder = builder.header(CONTENT_TYPE, HeaderValue::from_bytes(value).unwrap());
            }
            let response = builder
                .send()
                .await
                .map_err(|e| format!("no answer: {e:?}"))?;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = response
                .bytes()
                .await
                .map_err(|e| format!("answer cut off: {e:?}"))?
                .to_vec();
            Ok(Answer {
                status,
                content_type,
                body,
            })
        }
        Request::Raw(bytes) => {
            let addr = base.trim_start_matches("http://").to_string();
            let bytes = bytes.clone();
            tokio::task::spawn_blocking(move || send_raw(&addr, &bytes))
                .await
                .map_err(|e| format!("raw request task failed: {e}"))?
        }
    }
}

/// Writes `bytes` on a fresh connection and reads the answer up to EOF
/// (the requests say `Connection: close`). Blocking std I/O with
/// timeouts: tokio's `io-util` feature is not enabled in this workspace.
pub(crate) fn send_raw(addr: &str, bytes: &[u8]) -> Result<Answer, String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).map_err(|e| format!("cannot connect: {e}"))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    stream
        .write_all(bytes)
        .map_err(|e| format!("request cut off: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("answer cut off: {e}"))?;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "no answer: the connection closed without a response".to_string())?;
    let head = String::from_utf8_lossy(&response[..end]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line in {head}"))?;
    let mut content_type = String::new();
    for (name, value) in lines.filter_map(|line| line.split_once(':')) {
        if name.eq_ignore_ascii_case("content-type") {
            content_type = value.trim().to_string();
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked answers are not expected".into());
        }
    }
    Ok(Answer {
        status,
        content_type,
        body: response[end + 4..].to_vec(),
    })
}
