use super::protocol::Subscription;
use super::*;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn state_of_the_world_subscriptions_replace_and_empty_means_all() {
    let mut sent = Sent::default();
    let eds = ENDPOINT_TYPE_URL;
    assert!(sent.subscribe(eds, Subscription::Replace(names(&["a", "b"]))));
    assert!(sent.wants(eds, "a") && !sent.wants(eds, "c"));
    // The same names again (an ACK): no change.
    assert!(!sent.subscribe(eds, Subscription::Replace(names(&["b", "a"]))));
    // A new cluster's endpoints asked for with the ACK: a change.
    assert!(sent.subscribe(eds, Subscription::Replace(names(&["a", "b", "c"]))));
    assert!(sent.wants(eds, "c"));
    assert!(sent.subscribe(LISTENER_TYPE_URL, Subscription::Replace(vec![])));
    assert!(sent.wants(LISTENER_TYPE_URL, "anything"));
    assert!(!sent.subscribe(LISTENER_TYPE_URL, Subscription::Replace(vec![])));
}

#[test]
fn delta_subscriptions_add_and_remove_names_and_start_as_wildcard_without_names() {
    let mut sent = Sent::default();
    let change = |subscribe: &[&str], unsubscribe: &[&str]| Subscription::Change {
        subscribe: names(subscribe),
        unsubscribe: names(unsubscribe),
    };
    assert!(sent.subscribe(CLUSTER_TYPE_URL, change(&[], &[])));
    assert!(sent.wants(CLUSTER_TYPE_URL, "x"));
    assert!(!sent.subscribe(CLUSTER_TYPE_URL, change(&[], &[])));

    let eds = ENDPOINT_TYPE_URL;
    assert!(sent.subscribe(eds, change(&["a", "b"], &[])));
    assert!(sent.wants(eds, "b") && !sent.wants(eds, "c"));
    assert!(sent.subscribe(eds, change(&["c"], &["a"])));
    assert!(!sent.wants(eds, "a") && sent.wants(eds, "c"));
    assert!(!sent.subscribe(eds, change(&[], &[])));
    assert!(sent.subscribe(eds, change(&["*"], &[])));
    assert!(sent.wants(eds, "a"));
}
