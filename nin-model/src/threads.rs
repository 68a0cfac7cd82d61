//! Which threads run a caller's passes: the caller's own, as one of a
//! pool's workers.
//!
//! A CPU pass forks onto rayon's workers several times a layer. Forked
//! from a worker, a fork goes on that worker's own deque and an idle
//! worker steals it; called from any other thread (a server's model
//! thread, a benchmark's loop), a pass is first handed to the pool and
//! the caller sleeps until it is done (`tape`'s `on_worker`): a wake-up
//! on each side per pass, which at batch 1 cost about a sixth of the
//! compact network's time on two threads.

/// Runs `op` on this thread as worker 0 of a new thread pool of rayon's
/// default size (`RAYON_NUM_THREADS`, else one thread per core, this one
/// included), so that the passes `op` runs fork onto that pool with no
/// hand-off, as an ONNX Runtime session's caller takes part in its own
/// passes.
///
/// For a long-lived thread that runs many passes: the pool lives as long
/// as the process (rayon cannot take a borrowed thread out of a pool
/// again), and jobs other threads send to it are not run on this thread
/// while `op` does something else (waits for a request, say). If this
/// thread already is one of rayon's workers, or a pool cannot be built,
/// `op` runs as it is (with a warning in the second case).
pub fn as_pool_worker<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return op();
    }
    match rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .thread_name(|i| format!("nin-pool-{i}"))
        .build()
    {
        Ok(pool) => pool.install(op),
        Err(error) => {
            tracing::warn!("no thread pool of this thread's own ({error}): each pass is handed to rayon's global pool");
            op()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn the_caller_becomes_worker_zero_and_forks_reach_every_worker() {
        let (index, ran_on, threads) = std::thread::spawn(|| {
            as_pool_worker(|| {
                let threads = rayon::current_num_threads();
                // As many tasks as workers, each waiting (a while at most)
                // until all have started: each runs on a worker of its own.
                let (started, ran_on) = (AtomicUsize::new(0), Mutex::new(BTreeSet::new()));
                rayon::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(|_| {
                            started.fetch_add(1, Ordering::SeqCst);
                            let deadline = Instant::now() + Duration::from_secs(10);
                            while started.load(Ordering::SeqCst) < threads
                                && Instant::now() < deadline
                            {
                                std::hint::spin_loop();
                            }
                            ran_on.lock().unwrap().insert(rayon::current_thread_index());
                        });
                    }
                });
                // Already a worker: no second pool.
                let nested = as_pool_worker(rayon::current_thread_index);
                assert_eq!(nested, rayon::current_thread_index());
                (
                    rayon::current_thread_index(),
                    ran_on.into_inner().unwrap(),
                    threads,
                )
            })
        })
        .join()
        .unwrap();
        assert_eq!(index, Some(0));
        assert_eq!(ran_on, (0..threads).map(Some).collect());
    }
}
