//! CPU work of a batch's size inside async code.

/// Runs `work`, CPU work that grows with a batch (hashing or sorting tens of thousands of rows), without holding up
/// the tasks queued behind it on this async worker: on a multi-threaded tokio runtime the worker hands its queue to
/// another thread for the duration (`block_in_place`), so an alert that arrives meanwhile is not kept waiting. On a
/// single-threaded runtime (tests) or outside a runtime it runs inline. For work that borrows from the caller, where
/// `spawn_blocking` would need owned data.
pub fn off_the_workers<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_inline_outside_a_runtime() {
        assert_eq!(off_the_workers(|| 2 + 2), 4);
    }

    #[tokio::test]
    async fn runs_inline_on_a_single_threaded_runtime() {
        assert_eq!(off_the_workers(|| 2 + 2), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_task_queued_behind_the_work_runs_meanwhile() {
        // On the runtime's only worker: without the hand-over, the task spawned from there could not run until the
        // work ended, and the work waits for it.
        let on_the_worker = tokio::spawn(async {
            let (sender, receiver) = std::sync::mpsc::channel();
            tokio::spawn(async move { sender.send(()).unwrap() });
            off_the_workers(|| receiver.recv_timeout(std::time::Duration::from_secs(5)))
        });
        on_the_worker.await.unwrap().expect("the queued task ran while the work waited for it");
    }
}
