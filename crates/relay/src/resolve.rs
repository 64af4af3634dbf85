//! Name resolution owned by the relay: a trait so tests inject a hosts map and never depend on
//! the machine's DNS; the production resolver consults static `hosts` first, then the system.
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

/// Why a name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// NXDOMAIN or no address records.
    #[error("name does not resolve")]
    NotFound,
    /// The lookup failed for another reason (SERVFAIL, network).
    #[error("lookup failed")]
    Failed,
}

/// Boxed future returned by [`Resolver::resolve`].
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, ResolveError>> + Send + 'a>>;

/// Turns a DNS name into addresses. Timeouts and concurrency limits are applied by the caller.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a>;
}

/// Static entries first, then (unless `hosts_only`) the system resolver.
#[derive(Debug, Clone, Default)]
pub struct HostsThenSystem {
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    pub hosts_only: bool,
}

impl Resolver for HostsThenSystem {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            if let Some(addrs) = self.hosts.get(name) {
                return if addrs.is_empty() {
                    Err(ResolveError::NotFound)
                } else {
                    Ok(addrs.clone())
                };
            }
            if self.hosts_only {
                return Err(ResolveError::NotFound);
            }
            system_lookup(name).await
        })
    }
}

async fn system_lookup(name: &str) -> Result<Vec<IpAddr>, ResolveError> {
    match tokio::net::lookup_host((name, 0)).await {
        Ok(it) => {
            let mut out: Vec<IpAddr> = Vec::new();
            for sa in it {
                if !out.contains(&sa.ip()) {
                    out.push(sa.ip());
                }
            }
            if out.is_empty() {
                Err(ResolveError::NotFound)
            } else {
                Ok(out)
            }
        }
        Err(e) => Err(classify_lookup_error(&e)),
    }
}

/// getaddrinfo's EAI_NONAME / EAI_NODATA surface as io errors with these messages; anything else
/// (EAI_AGAIN, EAI_FAIL, ...) is a resolver failure rather than a definite "no such name".
fn classify_lookup_error(e: &std::io::Error) -> ResolveError {
    let msg = e.to_string().to_ascii_lowercase();
    if msg.contains("not known") || msg.contains("no address") || msg.contains("not found") {
        ResolveError::NotFound
    } else {
        ResolveError::Failed
    }
}

/// A resolver that never answers; tests use it to provoke `dns_timeout`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NeverResolves;

impl Resolver for NeverResolves {
    fn resolve<'a>(&'a self, _name: &'a str) -> ResolveFuture<'a> {
        Box::pin(std::future::pending())
    }
}

/// Sorts nothing, only pairs addresses with the port.
pub(crate) fn with_port(addrs: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hosts_entries_answer_before_the_system() {
        let mut r = HostsThenSystem::default();
        r.hosts
            .insert("origin.test".into(), vec!["127.0.0.1".parse().unwrap()]);
        r.hosts_only = true;
        assert_eq!(
            r.resolve("origin.test").await,
            Ok(vec!["127.0.0.1".parse().unwrap()])
        );
        assert_eq!(r.resolve("other.test").await, Err(ResolveError::NotFound));
    }

    // The system resolver itself is not asked (tests never use the machine's DNS): the messages
    // below are what std's lookup_host reports for glibc's getaddrinfo errors.
    #[test]
    fn getaddrinfo_errors_split_into_not_found_and_failed() {
        let err =
            |m: &str| std::io::Error::other(format!("failed to lookup address information: {m}"));
        for m in [
            "Name or service not known",
            "No address associated with hostname",
        ] {
            assert_eq!(
                classify_lookup_error(&err(m)),
                ResolveError::NotFound,
                "{m}"
            );
        }
        for m in [
            "Temporary failure in name resolution",
            "Non-recoverable failure in name resolution",
        ] {
            assert_eq!(classify_lookup_error(&err(m)), ResolveError::Failed, "{m}");
        }
    }

    #[tokio::test]
    async fn hosts_only_and_empty_entries_are_not_found() {
        let mut r = HostsThenSystem {
            hosts_only: true,
            ..Default::default()
        };
        r.hosts.insert("empty.test".into(), vec![]);
        assert_eq!(r.resolve("empty.test").await, Err(ResolveError::NotFound));
        r.hosts_only = false;
        // An empty entry answers NotFound without asking the system.
        assert_eq!(r.resolve("empty.test").await, Err(ResolveError::NotFound));
    }
}
