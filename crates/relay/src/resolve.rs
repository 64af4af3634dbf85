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
        // getaddrinfo's EAI_NONAME / EAI_NODATA surface as io errors with these messages; anything
        // else is a resolver failure rather than a definite "no such name".
        Err(e) => {
            let msg = e.to_string().to_ascii_lowercase();
            if msg.contains("not known") || msg.contains("no address") || msg.contains("not found")
            {
                Err(ResolveError::NotFound)
            } else {
                Err(ResolveError::Failed)
            }
        }
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

    // The one test allowed to use the system resolver: `.invalid` never resolves (RFC 6761 §6.4).
    #[tokio::test]
    async fn invalid_tld_is_not_found_via_system_resolver() {
        let r = HostsThenSystem::default();
        let res = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            r.resolve("cfr-test.invalid"),
        )
        .await;
        match res {
            Ok(Err(_)) => {}
            other => panic!("expected a resolution error for .invalid, got {other:?}"),
        }
    }
}
