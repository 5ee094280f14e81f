//! Fetching `http(s)://` image URLs, off by default (`--allow-remote-media`).
//!
//! A server that fetches URLs for its clients must not become a way into the network it sits in.
//! So every hop is checked: the host must be on the allow-list when one is given; the name is
//! resolved once and every address must be public (no loopback, private, link-local, unique-local or
//! unspecified addresses) unless the host or address is explicitly allowed; the connection is pinned
//! to the checked address (no DNS rebinding between check and connect); redirects are followed by
//! hand, at most three, each target checked the same way; the body is capped and the whole fetch has
//! a timeout.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;

use crate::error::{ClassifiedError, ErrorClass};

#[derive(Debug, Clone)]
pub struct RemoteMediaConfig {
    /// Hosts (names or IP addresses) allowed; empty = any public host.
    pub allow_hosts: Vec<String>,
    pub max_bytes: usize,
    pub timeout: Duration,
}

impl Default for RemoteMediaConfig {
    fn default() -> Self {
        Self {
            allow_hosts: vec![],
            max_bytes: 20 * 1024 * 1024,
            timeout: Duration::from_secs(10),
        }
    }
}

fn refuse(param: &str, msg: impl Into<String>) -> ClassifiedError {
    ClassifiedError::invalid(param, msg)
}

/// Whether an address is reachable from the public internet (the only kind fetched by default).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // carrier-grade NAT 100.64/10
                || (o[0] == 198 && (o[1] & 0xFE) == 18)) // benchmarking 198.18/15
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00 // unique local fc00::/7
                || (s[0] & 0xFFC0) == 0xFE80) // link local fe80::/10
        }
    }
}

impl RemoteMediaConfig {
    fn host_allowed(&self, host: &str) -> bool {
        self.allow_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Fetches one URL; `param` names the request field in errors.
    pub async fn fetch(&self, param: &str, url: &str) -> Result<Vec<u8>, ClassifiedError> {
        tokio::time::timeout(self.timeout, self.fetch_inner(param, url))
            .await
            .map_err(|_| {
                refuse(
                    param,
                    format!(
                        "{param}: fetching {url} took longer than {} s",
                        self.timeout.as_secs()
                    ),
                )
            })?
    }

    async fn fetch_inner(&self, param: &str, url: &str) -> Result<Vec<u8>, ClassifiedError> {
        let mut current = reqwest::Url::parse(url)
            .map_err(|e| refuse(param, format!("{param}: invalid URL: {e}")))?;
        for _hop in 0..=3 {
            let addr = self.check(param, &current).await?;
            let host = current.host_str().unwrap_or_default().to_string();
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .resolve(&host, addr)
                .build()
                .map_err(|e| ClassifiedError::new(ErrorClass::Internal, e.to_string()))?;
            let resp =
                client.get(current.clone()).send().await.map_err(|e| {
                    refuse(param, format!("{param}: fetching {current} failed: {e}"))
                })?;
            if resp.status().is_redirection() {
                let loc = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| {
                        refuse(param, format!("{param}: {current} redirects nowhere"))
                    })?;
                current = current
                    .join(loc)
                    .map_err(|e| refuse(param, format!("{param}: bad redirect target: {e}")))?;
                continue;
            }
            if !resp.status().is_success() {
                return Err(refuse(
                    param,
                    format!("{param}: {current} answered {}", resp.status()),
                ));
            }
            if resp
                .content_length()
                .is_some_and(|l| l as usize > self.max_bytes)
            {
                return Err(self.too_large(param));
            }
            let mut body = Vec::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    refuse(param, format!("{param}: reading {current} failed: {e}"))
                })?;
                if body.len() + chunk.len() > self.max_bytes {
                    return Err(self.too_large(param));
                }
                body.extend_from_slice(&chunk);
            }
            return Ok(body);
        }
        Err(refuse(param, format!("{param}: more than 3 redirects")))
    }

    fn too_large(&self, param: &str) -> ClassifiedError {
        ClassifiedError::new(
            ErrorClass::PayloadTooLarge,
            format!(
                "{param}: the remote image is larger than {} bytes",
                self.max_bytes
            ),
        )
        .with_param(param)
    }

    /// Checks one hop and returns the address to connect to.
    async fn check(&self, param: &str, url: &reqwest::Url) -> Result<SocketAddr, ClassifiedError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refuse(
                param,
                format!("{param}: only http and https URLs are fetched"),
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| refuse(param, format!("{param}: the URL has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let explicitly_allowed = self.host_allowed(&host);
        if !self.allow_hosts.is_empty() && !explicitly_allowed {
            return Err(refuse(
                param,
                format!("{param}: host {host} is not on this server's allow-list"),
            ));
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| refuse(param, format!("{param}: cannot resolve {host}: {e}")))?
            .collect();
        let first = *addrs
            .first()
            .ok_or_else(|| refuse(param, format!("{param}: {host} has no address")))?;
        if !explicitly_allowed {
            if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(refuse(
                    param,
                    format!(
                        "{param}: {host} resolves to the non-public address {}; this server only fetches public addresses",
                        bad.ip()
                    ),
                ));
            }
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
