//! Admission control for client connections: how many a client address, and the relay as a whole,
//! may hold open. A leaf module: every front-end asks it before it spends a handshake.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections per client address, and in total.
#[derive(Debug)]
pub(crate) struct ClientTable {
    per_client: u32,
    total: u32,
    inner: Mutex<(HashMap<IpAddr, u32>, u32)>,
}

/// One admitted connection's place in the [`ClientTable`]; freed on drop.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    table: Arc<ClientTable>,
    ip: IpAddr,
}

impl ClientTable {
    pub(crate) fn new(per_client: u32, total: u32) -> Self {
        Self {
            per_client,
            total,
            inner: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// A slot for one more connection from `ip`, unless that client or the relay is at its limit.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut g = self.inner.lock().expect("client table");
        let (map, count) = &mut *g;
        if *count >= self.total {
            return None;
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        *count += 1;
        Some(ClientSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut g = self.table.inner.lock().expect("client table");
        let (map, count) = &mut *g;
        *count -= 1;
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_client_and_in_total_and_freed_on_drop() {
        let table = Arc::new(ClientTable::new(2, 3));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = table.admit(a).expect("first from a");
        let _a2 = table.admit(a).expect("second from a");
        assert!(
            table.admit(a).is_none(),
            "a third from one client is refused"
        );
        let _b1 = table.admit(b).expect("first from b");
        assert!(table.admit(b).is_none(), "the relay-wide total is 3");
        drop(a1);
        assert!(table.admit(b).is_some(), "a freed slot can be taken again");
    }
}
