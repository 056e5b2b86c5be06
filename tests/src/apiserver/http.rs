//! Just enough HTTP/1.1 for the test API server: request heads (GET, keep-alive), responses
//! with a length, and chunked responses for watch streams, as the real API server sends them.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, Write},
};

/// Longest request head accepted; kube's requests are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// Reads one request head and skips its body; `None` when the client closed the connection.
pub(super) fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(_version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("malformed request line"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method: method.to_string(),
        path: percent_decode(path),
        query: parse_query(query),
        close: false,
    };
    let mut body_len = 0usize;
    let mut head_len = line.len();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(invalid("connection closed inside the request head"));
        }
        head_len += line.len();
        if head_len > MAX_HEAD {
            return Err(invalid("request head too long"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(invalid("malformed header"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            body_len = value
                .parse()
                .map_err(|_| invalid("malformed content-length"))?;
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            request.close = true;
        }
    }
    io::copy(
        &mut io::Read::take(&mut *reader, body_len as u64),
        &mut io::sink(),
    )?;
    Ok(Some(request))
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space), as kube encodes queries.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A complete response with a length.
pub(super) fn write_response(w: &mut impl Write, code: u16, body: &[u8]) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    )?;
    w.write_all(body)?;
    w.flush()
}

/// The head of a streamed (chunked) 200 response.
pub(super) fn write_stream_head(w: &mut impl Write) -> io::Result<()> {
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    w.flush()
}

pub(super) fn write_chunk(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        // An empty chunk would end the stream.
        return Ok(());
    }
    write!(w, "{:x}\r\n", data.len())?;
    w.write_all(data)?;
    w.write_all(b"\r\n")?;
    w.flush()
}

/// Ends a chunked response cleanly; the connection stays usable.
pub(super) fn write_last_chunk(w: &mut impl Write) -> io::Result<()> {
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kube_style_requests_and_skips_bodies() {
        let raw = "GET /api/v1/pods?watch=true&resourceVersion=12&continue=a%2Bb%3D HTTP/1.1\r\n\
                   host: 127.0.0.1\r\ncontent-length: 3\r\n\r\nabcGET /api/v1/nodes HTTP/1.1\r\n\
                   Connection: close\r\n\r\n";
        let mut reader = io::BufReader::new(raw.as_bytes());
        let first = read_request(&mut reader).unwrap().unwrap();
        assert_eq!(first.method, "GET");
        assert_eq!(first.path, "/api/v1/pods");
        assert_eq!(first.query["watch"], "true");
        assert_eq!(first.query["resourceVersion"], "12");
        assert_eq!(first.query["continue"], "a+b=");
        assert!(!first.close);
        let second = read_request(&mut reader).unwrap().unwrap();
        assert_eq!(second.path, "/api/v1/nodes");
        assert!(second.close);
        assert_eq!(read_request(&mut reader).unwrap(), None);
    }

    #[test]
    fn malformed_requests_are_errors() {
        for raw in [
            "GARBAGE\r\n\r\n",
            "GET / HTTP/1.1\r\nno-colon\r\n\r\n",
            "GET / HTTP/1.1\r\n",
        ] {
            let mut reader = io::BufReader::new(raw.as_bytes());
            assert!(read_request(&mut reader).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn chunks_frame_the_data() {
        let mut out = Vec::new();
        write_stream_head(&mut out).unwrap();
        write_chunk(&mut out, b"{\"a\":1}\n").unwrap();
        write_chunk(&mut out, b"").unwrap();
        write_last_chunk(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with("\r\n\r\n8\r\n{\"a\":1}\n\r\n0\r\n\r\n"),
            "{text:?}"
        );
    }
}
