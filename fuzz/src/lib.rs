//! What the fuzz targets share: turning raw bytes into an HTTP request the way the server sees one.
//!
//! The HTTP targets take a whole request (`PUT /path HTTP/1.1`, headers, blank line, body), so the
//! seeds are readable requests and the fuzzer mutates method, path, headers and body together.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

/// Most headers read from one input; more make the input uninteresting, not an error.
const MAX_HEADERS: usize = 32;

/// One request as a handler receives it: what hyper and axum would have validated already.
pub struct HttpRequest<'a> {
    /// The method.
    pub method: Method,
    /// The URI's path, still percent-encoded, as `Uri::path` gives it.
    pub path: String,
    /// The headers whose names and values are valid.
    pub headers: HeaderMap,
    /// Everything after the blank line.
    pub body: &'a [u8],
}

impl<'a> HttpRequest<'a> {
    /// Parses `data` as an HTTP/1.1 request head followed by its body; `None` for what hyper would
    /// refuse before any handler runs.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut raw);
        let httparse::Status::Complete(head) = request.parse(data).ok()? else {
            return None;
        };
        let method = Method::from_bytes(request.method?.as_bytes()).ok()?;
        let path = Uri::try_from(request.path?).ok()?.path().to_owned();
        let mut headers = HeaderMap::new();
        for header in request.headers.iter() {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(header.name.as_bytes()),
                HeaderValue::from_bytes(header.value),
            ) else {
                return None;
            };
            headers.append(name, value);
        }
        Some(Self {
            method,
            path,
            headers,
            body: &data[head..],
        })
    }
}
