//! `rolecache healthcheck`: one GET of `/readyz` over plain HTTP/1.1 with the standard library
//! (the image has no curl), for Docker's HEALTHCHECK and compose.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// `/readyz` where `http_addr` serves it: its address, or the loopback when it listens on all
/// addresses (or is unset: port 8080).
pub fn default_url(http_addr: Option<SocketAddr>) -> String {
    let addr = match http_addr {
        None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        Some(a) if a.ip().is_unspecified() && a.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        Some(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        Some(a) => a,
    };
    format!("http://{addr}/readyz")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_follows_the_http_address() {
        assert_eq!(default_url(None), "http://127.0.0.1:8080/readyz");
        let url = |a: &str| default_url(Some(a.parse().unwrap()));
        assert_eq!(url("0.0.0.0:9000"), "http://127.0.0.1:9000/readyz");
        assert_eq!(url("[::]:9000"), "http://[::1]:9000/readyz");
        assert_eq!(url("10.1.2.3:8081"), "http://10.1.2.3:8081/readyz");
    }

    #[test]
    fn probe_refuses_what_it_cannot_fetch() {
        assert!(probe("https://127.0.0.1/readyz", Duration::from_millis(100)).is_err());
        assert!(probe("ftp://x", Duration::from_millis(100)).is_err());
    }
}
