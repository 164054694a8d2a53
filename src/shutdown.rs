//! How background tasks stop: one model for every long-running task of the process.
//!
//! * A [`Tasks`] is a node of a tree of [`CancellationToken`]s: cancelling a node cancels its
//!   whole subtree, never its parent. Each node has a [`TaskTracker`] of its own, and a task
//!   spawned on a node is tracked by that node and by every ancestor, so waiting on a node waits
//!   for its whole subtree.
//! * A task stops by itself when its node is cancelled: it selects on [`Tasks::cancelled`], or
//!   is spawned with [`Tasks::spawn_cancellable`], which drops its future at its next await
//!   (closing whatever sockets it owned) as soon as the token is cancelled.
//! * Stopping is [`Tasks::shutdown`]: cancel, then wait for the subtree's tasks.
//!   [`Tasks::shutdown_within`] waits at most a deadline, then names the tasks still running and
//!   aborts them — the only place a task of ours is aborted, as the deadline's last resort.
//! * Nothing is detached by dropping a handle: a component's handle holds a guard that cancels
//!   its node when dropped ([`Tasks::cancel_on_drop`]), and [`Scoped`] does the same for a task
//!   whose output its owner awaits.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// After the deadline's aborts: time for the aborted tasks to be dropped.
const ABORT_GRACE: Duration = Duration::from_millis(500);

/// Ids of spawned tasks (process-wide, never reused).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The tasks spawned under one node: their name and how to abort them, by id. Entries of
/// finished tasks are skipped when read and pruned when a task is added.
type Live = Mutex<BTreeMap<u64, (&'static str, AbortHandle)>>;

/// One node's own tracker and its record of names.
#[derive(Clone)]
struct Node {
    tracker: TaskTracker,
    live: Arc<Live>,
}

impl Node {
    fn new() -> Node {
        Node {
            tracker: TaskTracker::new(),
            live: Arc::default(),
        }
    }
}

/// A node of the shutdown tree: a cancellation token and the tasks spawned under it (see the
/// module documentation). Clones are the same node.
#[derive(Clone)]
pub struct Tasks {
    token: CancellationToken,
    /// This node first, then its ancestors up to the root.
    nodes: Vec<Node>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

impl Tasks {
    /// A root: cancelled only through itself.
    pub fn new() -> Tasks {
        Tasks {
            token: CancellationToken::new(),
            nodes: vec![Node::new()],
        }
    }

    /// A child node: cancelled with this one (or on its own); its tasks are waited for by this
    /// node too.
    pub fn child(&self) -> Tasks {
        let mut nodes = Vec::with_capacity(self.nodes.len() + 1);
        nodes.push(Node::new());
        nodes.extend(self.nodes.iter().cloned());
        Tasks {
            token: self.token.child_token(),
            nodes,
        }
    }

    /// The node's token.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Completes once the node is cancelled.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Cancels the node and its subtree; tasks stop at their next await.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// A guard that cancels the node when dropped: what a component's handle holds.
    pub fn cancel_on_drop(&self) -> DropGuard {
        self.token.clone().drop_guard()
    }

    /// Spawns `task`, tracked by this node and its ancestors. The task must end by itself once
    /// the node is cancelled (use [`Tasks::spawn_cancellable`] unless it needs to clean up).
    pub fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let tracked: Vec<_> = self.nodes.iter().map(|n| n.tracker.token()).collect();
        let handle = tokio::spawn(async move {
            // Counted by every tracker until the future is dropped: done, cancelled or aborted.
            let _tracked = tracked;
            task.await
        });
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        for node in &self.nodes {
            let mut live = node.live.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|_, (_, task)| !task.is_finished());
            live.insert(id, (name, handle.abort_handle()));
        }
        handle
    }

    /// Spawns `task` and drops it at its next await once the node is cancelled; the output is
    /// `None` then.
    pub fn spawn_cancellable<F>(&self, name: &'static str, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let token = self.token.clone();
        self.spawn(name, async move {
            tokio::select! {
                () = token.cancelled() => None,
                output = task => Some(output),
            }
        })
    }

    /// Spawns `task` on a child node that is cancelled when the returned handle is dropped.
    pub fn spawn_scoped<F>(&self, name: &'static str, task: F) -> Scoped<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let scope = self.child();
        Scoped {
            task: scope.spawn_cancellable(name, task),
            _stop: scope.cancel_on_drop(),
        }
    }

    /// The names of the tasks of this subtree still running.
    pub fn running(&self) -> Vec<&'static str> {
        let live = self.nodes[0].live.lock().unwrap_or_else(|e| e.into_inner());
        live.values()
            .filter(|(_, task)| !task.is_finished())
            .map(|(name, _)| *name)
            .collect()
    }

    /// Cancels the subtree and waits until all its tasks have ended.
    pub async fn shutdown(&self) {
        self.cancel();
        let tracker = &self.nodes[0].tracker;
        tracker.close();
        tracker.wait().await;
    }

    /// [`Tasks::shutdown`], waiting at most `deadline`. Past it, the tasks still running are
    /// aborted (the last resort: a task that did not notice its cancellation) and their names
    /// returned.
    pub async fn shutdown_within(&self, deadline: Duration) -> Result<(), Vec<&'static str>> {
        if tokio::time::timeout(deadline, self.shutdown())
            .await
            .is_ok()
        {
            return Ok(());
        }
        let stuck = self.running();
        {
            let live = self.nodes[0].live.lock().unwrap_or_else(|e| e.into_inner());
            for (_, task) in live.values() {
                task.abort();
            }
        }
        // An aborted task is dropped at its next poll.
        let _ = tokio::time::timeout(ABORT_GRACE, self.nodes[0].tracker.wait()).await;
        Err(stuck)
    }
}

/// A task whose owner awaits its output, and which is cancelled when the owner drops this
/// handle (see [`Tasks::spawn_scoped`]). Its output is `None` if it was cancelled first.
pub struct Scoped<T> {
    task: JoinHandle<Option<T>>,
    _stop: DropGuard,
}

impl<T> Future for Scoped<T> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        Pin::new(&mut self.task)
            .poll(cx)
            .map(|joined| joined.ok().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_parent_waits_for_its_childrens_tasks_and_a_child_only_for_its_own() {
        let root = Tasks::new();
        let child = root.child();
        child.spawn_cancellable("child", std::future::pending::<()>());
        root.spawn_cancellable("root", std::future::pending::<()>());
        assert_eq!(root.running(), vec!["child", "root"]);
        assert_eq!(child.running(), vec!["child"]);
        child.shutdown().await;
        assert!(!root.is_cancelled());
        assert_eq!(root.running(), vec!["root"]);
        root.shutdown().await;
        assert_eq!(root.running(), Vec::<&str>::new());
    }

    #[tokio::test]
    async fn a_task_that_ignores_its_token_is_named_and_aborted_at_the_deadline() {
        let root = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        root.spawn("stubborn", async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        let stuck = root.shutdown_within(Duration::from_millis(50)).await;
        assert_eq!(stuck, Err(vec!["stubborn"]));
        // Aborted: its future (and the sender it held) was dropped.
        assert!(rx.await.is_err());
    }

    #[tokio::test]
    async fn dropping_a_scoped_handle_stops_its_task() {
        let root = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let scoped = root.spawn_scoped("scoped", async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(scoped);
        assert!(rx.await.is_err());
        assert_eq!(root.shutdown_within(Duration::from_secs(1)).await, Ok(()));
    }
}
