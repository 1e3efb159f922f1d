//! The thread the pipeline's model work runs on: fitting each series' anomaly detector and scoring committed
//! readings. It runs at a lower CPU priority than the rest of the process (nice +10 on Linux), because that work
//! has seconds to spare and the work beside it has not: a farm's alerts go out, and edge links commit readings, on
//! the same cores. When the cores are free the model work runs at full speed; when they are busy it waits, and a
//! scorer that falls too far behind skips batches the way it always has (counted in
//! `smartfarm_inference_events_missed_total`). Requests to `InferenceService` do not use it: someone waits for them.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use smartfarm_core::{Error, Result};

/// How much lower the thread's priority is than the process's (a nice value: 10 gives it about a tenth of a core's
/// time against one busy thread of normal priority).
const NICENESS: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// One background thread, started at the first job and ended when the last handle to it is dropped.
#[derive(Clone, Default)]
pub(crate) struct BackgroundThread {
    jobs: Arc<Mutex<Option<mpsc::Sender<Job>>>>,
}

impl BackgroundThread {
    /// Runs `work` on the thread, after the jobs before it, and returns what it returned. A job that panics fails
    /// with an error; the thread goes on with the next.
    pub(crate) async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.sender()?.send(job).map_err(|_| Error::Unavailable("the pipeline's model thread has stopped".into()))?;
        result.await.map_err(|_| Error::Internal { context: "a model job panicked".into(), source: None })
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>> {
        let mut jobs = self.jobs.lock().expect("background jobs");
        if let Some(sender) = jobs.as_ref() {
            return Ok(sender.clone());
        }
        let (sender, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("model-pipeline".into())
            .spawn(move || {
                lower_priority();
                while let Ok(job) = receiver.recv() {
                    // The job's result channel closes with it, which tells its caller.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|error| Error::internal("start the pipeline's model thread", error))?;
        *jobs = Some(sender.clone());
        Ok(sender)
    }
}

/// Lowers the calling thread's CPU priority by [`NICENESS`]; where that cannot be done the thread runs at the
/// process's priority, and says so.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // On Linux a nice value belongs to a thread, and PRIO_PROCESS with a thread id sets that thread's alone.
        let thread = rustix::thread::gettid();
        let lowered = rustix::process::getpriority_process(Some(thread))
            .and_then(|now| rustix::process::setpriority_process(Some(thread), (now + NICENESS).min(19)));
        match lowered {
            Ok(()) => tracing::debug!(niceness = NICENESS, "the pipeline's model thread runs at a lower priority"),
            Err(error) => {
                tracing::warn!(%error, "cannot lower the model thread's priority; it competes with ingest and alerts")
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::debug!("the pipeline's model thread runs at the process's priority on this platform");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_at_a_lower_priority_and_a_panic_fails_only_its_own() {
        let thread = BackgroundThread::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let order = order.clone();
            thread.run(move || order.lock().unwrap().push(i)).await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);

        let panicked = thread.run(|| -> u8 { panic!("a bad series") }).await.unwrap_err();
        assert!(panicked.to_string().contains("panicked"), "{panicked}");
        assert_eq!(thread.run(|| 7).await.unwrap(), 7, "the thread goes on after a panic");

        #[cfg(target_os = "linux")]
        {
            let process = rustix::process::getpriority_process(None).unwrap();
            let on_thread = thread.run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid()))).await;
            assert_eq!(on_thread.unwrap().unwrap(), (process + NICENESS).min(19));
        }
    }
}
