//! Which threads run a caller's passes: the caller's own, as one of a
//! pool's workers ([`as_pool_worker`]), with the pool's other workers
//! kept awake while inference passes run (`with_workers_awake`).
//!
//! A CPU pass forks onto rayon's workers several times a layer. Forked
//! from a worker, a fork goes on that worker's own deque and an idle
//! worker steals it; called from any other thread (a server's model
//! thread, a benchmark's loop), a pass is first handed to the pool and
//! the caller sleeps until it is done (`tape`'s `on_worker`): a wake-up
//! on each side per pass, which at batch 1 cost about a sixth of the
//! compact network's time on two threads.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

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

/// How long, in µs, the pool's other workers keep looking for work after
/// this thread's last inference pass, before they may park.
const AWAKE_AFTER_US: u64 = 300;

/// The inference passes one thread runs, as the workers it keeps awake
/// see them.
#[derive(Default)]
struct Passes {
    /// Passes running now (a pass may nest another, e.g. a trace).
    running: AtomicUsize,
    /// When the last one ended, in µs since [`epoch`].
    ended_at: AtomicU64,
    /// Workers kept awake for this thread now.
    awake: AtomicUsize,
}

impl Passes {
    /// Whether a worker kept awake should go on looking for work.
    fn wanted(&self) -> bool {
        self.running.load(Ordering::Acquire) > 0
            || since_epoch_us().saturating_sub(self.ended_at.load(Ordering::Acquire))
                < AWAKE_AFTER_US
    }
}

thread_local! {
    /// This thread's passes.
    static PASSES: Arc<Passes> = Arc::default();
    /// Whether this thread is inside a pass of its own.
    static IN_PASS: Cell<bool> = const { Cell::new(false) };
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// Runs `op`, an inference pass, with the pool's other workers awake:
/// looking for work rather than parked, from its start until
/// [`AWAKE_AFTER_US`] past its end (so also between the passes of a steady
/// stream of requests).
///
/// Why: a pass at batch 1 forks a few times a layer, tens of
/// microseconds of work each time, and rayon parks a worker that found
/// nothing for a few dozen yields. A parked worker is woken by the
/// kernel, and on a virtual machine an idle vCPU is halted and woken by
/// the host: measured on a 2-vCPU Xeon VM, a woken worker came too late
/// to take much part, and two threads served the shipped network at
/// batch 1 only 1.0x to 1.2x as fast as one (each block's chain took
/// as long on two threads as on one). Kept awake, 1.15x to 1.6x faster
/// than before (compact b1 1.3x). ONNX Runtime's workers spin between
/// passes for the same reason. Each worker kept awake runs a job that
/// polls the pool for work (rayon's `yield_now`) until the passes stop;
/// it then returns, and the worker parks as usual. Costs a core per
/// awake worker while passes run, and [`AWAKE_AFTER_US`] after.
///
/// Outside a thread pool, `op` just runs.
pub(crate) fn with_workers_awake<R>(op: impl FnOnce() -> R) -> R {
    if rayon::current_thread_index().is_none() {
        return op();
    }
    let passes = PASSES.with(Arc::clone);
    passes.running.fetch_add(1, Ordering::AcqRel);
    let outer = IN_PASS.replace(true);
    let wanted = rayon::current_num_threads().saturating_sub(1);
    while passes.awake.load(Ordering::Acquire) < wanted {
        passes.awake.fetch_add(1, Ordering::AcqRel);
        let passes = Arc::clone(&passes);
        rayon::spawn(move || keep_looking(&passes));
    }
    /// Ends the pass, even one that panics.
    struct End(Arc<Passes>, bool);
    impl Drop for End {
        fn drop(&mut self) {
            self.0.ended_at.store(since_epoch_us(), Ordering::Release);
            self.0.running.fetch_sub(1, Ordering::AcqRel);
            IN_PASS.set(self.1);
        }
    }
    let _end = End(passes, outer);
    op()
}

/// A worker kept awake: runs whatever the pool has (the passes' forks)
/// while the passes want it, for [`AWAKE_FOR_AT_MOST_MS`] at most.
///
/// It runs jobs inside its own, so it must not outlive what lies below it
/// on its thread's stack. One that lands on a thread inside a pass of its
/// own (its owner's, which popped it from its own deque) returns at once:
/// that thread has a pass to finish. One that a worker takes up while it
/// waits on a part of another thread's pass (possible with more than two
/// workers and passes from several threads) holds that part up: the cap
/// bounds how long, and a next pass starts a fresh one.
fn keep_looking(passes: &Passes) {
    let started = Instant::now();
    while !IN_PASS.get() && passes.wanted() && started.elapsed().as_millis() < AWAKE_FOR_AT_MOST_MS
    {
        if let Some(rayon::Yield::Idle) | None = rayon::yield_now() {
            std::hint::spin_loop();
        }
    }
    passes.awake.fetch_sub(1, Ordering::AcqRel);
}

/// How long one job of [`keep_looking`] keeps its worker awake at most.
const AWAKE_FOR_AT_MOST_MS: u128 = 20;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Mutex};
    use std::time::{Duration, Instant};

    use super::*;

    /// Waits (10 s at most) until `done` holds.
    fn eventually(done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        true
    }

    #[test]
    fn a_pass_keeps_the_other_workers_looking_for_work_then_lets_them_park() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let (owner, awake_during, ran_on, awake_after) = pool.install(|| {
            let passes = PASSES.with(Arc::clone);
            let (awake_during, ran_on) = with_workers_awake(|| {
                // Both other workers take up a job that keeps them awake.
                let awake = eventually(|| passes.awake.load(Ordering::Acquire) == 2);
                // ... and a job this one leaves for them runs elsewhere.
                let (tx, rx) = mpsc::channel();
                rayon::spawn(move || tx.send(rayon::current_thread_index()).unwrap());
                (awake, rx.recv_timeout(Duration::from_secs(10)).unwrap())
            });
            // After the passes, they stop in time and may park.
            let after = eventually(|| passes.awake.load(Ordering::Acquire) == 0);
            (rayon::current_thread_index(), awake_during, ran_on, after)
        });
        assert!(awake_during, "the other workers were not kept awake");
        assert_ne!(
            ran_on, owner,
            "a job left by the pass ran on its own thread"
        );
        assert!(awake_after, "workers kept awake after the passes ended");
    }

    #[test]
    fn passes_from_several_threads_on_one_pool_all_finish() {
        // More workers than two and passes from several threads: a
        // worker may take up another thread's awake job while it runs a
        // part of a pass (see `keep_looking`).
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(4)
                .build()
                .unwrap(),
        );
        let (tx, rx) = mpsc::channel();
        for caller in 0..3 {
            let (pool, tx) = (Arc::clone(&pool), tx.clone());
            std::thread::spawn(move || {
                let mut total = 0u64;
                for pass in 0..200u64 {
                    total += pool.install(|| {
                        with_workers_awake(|| {
                            use rayon::prelude::*;
                            (0..64u64).into_par_iter().map(|i| i * pass).sum::<u64>()
                        })
                    });
                }
                tx.send((caller, total)).unwrap();
            });
        }
        drop(tx);
        let mut finished: Vec<_> = (0..3)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(60))
                    .expect("a caller hung")
            })
            .collect();
        finished.sort();
        let expected = (0..200u64).map(|p| p * 2016).sum::<u64>();
        assert_eq!(finished, vec![(0, expected), (1, expected), (2, expected)]);
    }

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
