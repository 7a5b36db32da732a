//! State shared by all VMs created from one [`crate::Harness`]: shared data with
//! compare-and-swap, shared queues with their pending `proxy_on_queue_ready`
//! notifications, and the fake clock.
//!
//! In Envoy this state is process-wide; here it is per Harness so parallel tests
//! that use different Harness values never see each other. Every lock is local
//! to one Harness (no global mutex) and poisoning is ignored, so a panicking
//! test cannot wedge others.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::abi::Status;
use crate::clock::Clock;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything VMs of one Harness share.
#[derive(Debug, Default)]
pub(crate) struct SharedState {
    pub(crate) clock: Clock,
    data: Mutex<SharedData>,
    queues: Mutex<Queues>,
    next_instance: AtomicU64,
}

impl SharedState {
    /// Allocates an id for a new VM instance and marks it alive (for queue ownership).
    pub(crate) fn new_instance(&self) -> u64 {
        let id = self.next_instance.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.queues).live.insert(id);
        id
    }

    /// Forgets a dropped VM: its pending notifications go, and queues it owns
    /// stop generating notifications (values still queue up, as in Envoy).
    pub(crate) fn drop_instance(&self, instance: u64) {
        let mut queues = lock(&self.queues);
        queues.live.remove(&instance);
        queues.pending.remove(&instance);
    }

    pub(crate) fn get_data(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.data).get(vm_id, key)
    }

    pub(crate) fn set_data(
        &self,
        vm_id: &str,
        key: &str,
        value: Vec<u8>,
        cas: u32,
    ) -> Result<u32, Status> {
        lock(&self.data).set(vm_id, key, value, cas)
    }

    pub(crate) fn register_queue(&self, vm_id: &str, name: &str, owner: QueueOwner) -> u32 {
        lock(&self.queues).register(vm_id, name, owner)
    }

    pub(crate) fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        lock(&self.queues).resolve(vm_id, name)
    }

    pub(crate) fn enqueue(&self, token: u32, value: Vec<u8>) -> Result<(), Status> {
        lock(&self.queues).enqueue(token, value)
    }

    pub(crate) fn dequeue(&self, token: u32) -> Result<Vec<u8>, Status> {
        lock(&self.queues).dequeue(token)
    }

    pub(crate) fn queue_len(&self, token: u32) -> Option<usize> {
        lock(&self.queues).queues.get(&token).map(|q| q.items.len())
    }

    /// Removes and returns the notifications pending for `instance`, oldest first.
    pub(crate) fn take_notifications(&self, instance: u64) -> Vec<QueueNotification> {
        lock(&self.queues)
            .pending
            .remove(&instance)
            .map(Vec::from)
            .unwrap_or_default()
    }

    pub(crate) fn pending_notifications(&self, instance: u64) -> usize {
        lock(&self.queues)
            .pending
            .get(&instance)
            .map_or(0, VecDeque::len)
    }
}

/// Key-value store with CAS, keyed by (vm_id, key) like proxy-wasm-cpp-host.
#[derive(Debug, Default)]
struct SharedData {
    values: HashMap<(String, String), (Vec<u8>, u32)>,
    last_cas: u32,
}

impl SharedData {
    fn next_cas(&mut self) -> u32 {
        self.last_cas = self.last_cas.wrapping_add(1);
        if self.last_cas == 0 {
            self.last_cas = 1;
        }
        self.last_cas
    }

    fn get(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.values
            .get(&(vm_id.to_string(), key.to_string()))
            .cloned()
    }

    /// `cas == 0` writes unconditionally; otherwise the stored CAS must match.
    /// Like cpp-host, a write to a missing key succeeds whatever the CAS.
    fn set(&mut self, vm_id: &str, key: &str, value: Vec<u8>, cas: u32) -> Result<u32, Status> {
        let k = (vm_id.to_string(), key.to_string());
        if let Some((_, current)) = self.values.get(&k)
            && cas != 0
            && cas != *current
        {
            return Err(Status::CasMismatch);
        }
        let new_cas = self.next_cas();
        self.values.insert(k, (value, new_cas));
        Ok(new_cas)
    }
}

/// Which VM and root context receive `proxy_on_queue_ready` for a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueOwner {
    pub(crate) instance: u64,
    pub(crate) context_id: u32,
}

/// A pending `proxy_on_queue_ready(context_id, token)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueNotification {
    pub(crate) context_id: u32,
    pub(crate) token: u32,
}

#[derive(Debug)]
struct Queue {
    owner: QueueOwner,
    items: VecDeque<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Queues {
    tokens: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
    pending: HashMap<u64, VecDeque<QueueNotification>>,
    live: HashSet<u64>,
    last_token: u32,
}

impl Queues {
    /// Registers (vm_id, name); re-registering keeps the token and moves
    /// ownership to the last registrant, as in Envoy.
    fn register(&mut self, vm_id: &str, name: &str, owner: QueueOwner) -> u32 {
        let key = (vm_id.to_string(), name.to_string());
        if let Some(token) = self.tokens.get(&key).copied()
            && let Some(queue) = self.queues.get_mut(&token)
        {
            queue.owner = owner;
            return token;
        }
        self.last_token = self.last_token.wrapping_add(1).max(1);
        let token = self.last_token;
        self.tokens.insert(key, token);
        self.queues.insert(
            token,
            Queue {
                owner,
                items: VecDeque::new(),
            },
        );
        token
    }

    fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.tokens
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    fn enqueue(&mut self, token: u32, value: Vec<u8>) -> Result<(), Status> {
        let queue = self.queues.get_mut(&token).ok_or(Status::NotFound)?;
        queue.items.push_back(value);
        let owner = queue.owner;
        if self.live.contains(&owner.instance) {
            self.pending
                .entry(owner.instance)
                .or_default()
                .push_back(QueueNotification {
                    context_id: owner.context_id,
                    token,
                });
        }
        Ok(())
    }

    fn dequeue(&mut self, token: u32) -> Result<Vec<u8>, Status> {
        let queue = self.queues.get_mut(&token).ok_or(Status::NotFound)?;
        queue.items.pop_front().ok_or(Status::Empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics() {
        let shared = SharedState::default();
        assert_eq!(shared.get_data("vm", "k"), None);
        // A missing key accepts any CAS.
        let c1 = shared
            .set_data("vm", "k", b"a".to_vec(), 77)
            .expect("first write");
        assert_ne!(c1, 0);
        assert_eq!(shared.get_data("vm", "k"), Some((b"a".to_vec(), c1)));
        let c2 = shared
            .set_data("vm", "k", b"b".to_vec(), c1)
            .expect("matching cas");
        assert_ne!(c2, c1);
        assert_eq!(
            shared.set_data("vm", "k", b"c".to_vec(), c1),
            Err(Status::CasMismatch)
        );
        assert_eq!(shared.get_data("vm", "k"), Some((b"b".to_vec(), c2)));
        // cas 0 is unconditional.
        let c3 = shared
            .set_data("vm", "k", b"d".to_vec(), 0)
            .expect("unconditional");
        assert_eq!(shared.get_data("vm", "k"), Some((b"d".to_vec(), c3)));
        // vm_id separates namespaces.
        assert_eq!(shared.get_data("other", "k"), None);
    }

    #[test]
    fn queues_notify_the_last_registrant() {
        let shared = SharedState::default();
        let a = shared.new_instance();
        let b = shared.new_instance();
        let t = shared.register_queue(
            "vm",
            "q",
            QueueOwner {
                instance: a,
                context_id: 1,
            },
        );
        assert_eq!(shared.resolve_queue("vm", "q"), Some(t));
        assert_eq!(shared.resolve_queue("other", "q"), None);
        shared.enqueue(t, b"1".to_vec()).expect("known queue");
        assert_eq!(shared.pending_notifications(a), 1);
        let again = shared.register_queue(
            "vm",
            "q",
            QueueOwner {
                instance: b,
                context_id: 3,
            },
        );
        assert_eq!(again, t, "same token on re-registration");
        shared.enqueue(t, b"2".to_vec()).expect("known queue");
        assert_eq!(
            shared.take_notifications(b),
            vec![QueueNotification {
                context_id: 3,
                token: t
            }]
        );
        assert_eq!(shared.take_notifications(a).len(), 1);
        assert_eq!(shared.queue_len(t), Some(2));
        assert_eq!(shared.dequeue(t), Ok(b"1".to_vec()));
        assert_eq!(shared.dequeue(t), Ok(b"2".to_vec()));
        assert_eq!(shared.dequeue(t), Err(Status::Empty));
        assert_eq!(shared.dequeue(t + 100), Err(Status::NotFound));
        assert_eq!(shared.enqueue(t + 100, vec![]), Err(Status::NotFound));
        // A dropped owner gets no more notifications.
        shared.drop_instance(b);
        shared.enqueue(t, b"3".to_vec()).expect("known queue");
        assert_eq!(shared.pending_notifications(b), 0);
    }
}
