//! `rolecache healthcheck`: one GET of `/readyz` over plain HTTP/1.1 with the standard library
//! (the image has no curl), for Docker's HEALTHCHECK and compose.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// `/readyz` on the loopback at the port of `http_addr` (8080 when unset).
pub fn default_url(http_addr: Option<SocketAddr>) -> String {
    let port = http_addr.map_or(8080, |a| a.port());
    format!("http://127.0.0.1:{port}/readyz")
}

/// GETs `url`; `Ok(first line of the body)` on 200, `Err(why)` otherwise.
pub fn probe(url: &str, timeout: Duration) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let deadline = Instant::now() + timeout;
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .map_err(|e| format!("{addr}: no answer: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| format!("{addr}: not an HTTP response"))?;
    let line = body.lines().next().unwrap_or("").trim().to_string();
    if status == "200" {
        Ok(line)
    } else {
        Err(format!("{status} {line}"))
    }
}
