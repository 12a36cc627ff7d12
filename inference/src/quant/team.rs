//! A team of threads for one step of work made of many small dependent parts (a decode step:
//! ~170 matrix products of a few hundred microseconds each, with norms and attention between).
//!
//! Handing each product to rayon's pool separately costs a wake-up and a sleep per product per
//! thread (hundreds of context switches per token). Instead [`run`] starts the body once on
//! every thread of the pool (`rayon::broadcast`) and the threads meet at a barrier
//! ([`TeamCtx::wait`]) between dependent parts, as llama.cpp's thread pool does. The barrier
//! spins for up to 50 µs, then sleeps on a condition variable: spinning alone made a chat in the
//! window 28% slower than rayon's per-product dispatch (17.4 against 24.1 tok/s, with the UI's
//! software renderer competing for the 2 cores), sleeping made it 27% faster (30.6), and the
//! quiet benchmark did not change. Each thread works on its [`TeamCtx::share`] (or its
//! [`Claims`]) of a product and publishes it through a [`Parts`] slot.
//!
//! While it spins, a thread warms the start of the weights it reads next
//! ([`TeamCtx::wait_warming`]; [`Claims`] give each thread its own pieces first, so it knows
//! which): decoding is bound by memory bandwidth, and a waiting thread otherwise leaves the
//! bus idle (median decode 93 against 86.5 tok/s over 8 interleaved runs on the Qwen2-0.5B
//! Q4_0 file at 2 threads).
//!
//! A body that fails or panics on one thread releases the others from their barriers with an
//! error instead of leaving them spinning.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// What a thread released from a barrier by another thread's failure returns.
const RELEASED: &str = "another thread of the team stopped with an error";

/// How long a thread spins at a barrier before it sleeps. Phases of a balanced step end within
/// microseconds of each other, so spinning wins there; a thread that waits longer is waiting
/// for a partner the system descheduled (a busy UI thread, another program), and sleeping
/// gives that partner the core.
const SPIN: Duration = Duration::from_micros(50);

struct Barrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    aborted: AtomicBool,
    /// Threads asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Barrier {
    fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Waits for the others; `idle` is called while spinning and does a little useful work
    /// (it returns `false` when it has none left).
    fn wait(&self, idle: &mut dyn FnMut() -> bool) -> Result<()> {
        if self.threads <= 1 {
            return self.check();
        }
        let generation = self.generation.load(Ordering::SeqCst);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            // The last to arrive resets the count before releasing the others, who do not
            // touch it until they see the new generation.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.wake_sleepers();
            return self.check();
        }
        let released = || {
            self.generation.load(Ordering::SeqCst) != generation
                || self.aborted.load(Ordering::SeqCst)
        };
        let start = Instant::now();
        let mut spins = 0u32;
        while !released() {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                // Sleep. A sleeper counts itself before its last check, and the releaser
                // bumps the generation before it reads the count, so no wake-up is lost.
                let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
                self.sleepers.fetch_add(1, Ordering::SeqCst);
                while !released() {
                    guard = self
                        .wake
                        .wait(guard)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            if !idle() {
                std::hint::spin_loop();
            }
        }
        self.check()
    }

    fn wake_sleepers(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.wake.notify_all();
        }
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.wake_sleepers();
    }

    fn check(&self) -> Result<()> {
        if self.aborted.load(Ordering::Acquire) {
            Err(Error::Panicked(RELEASED.to_owned()))
        } else {
            Ok(())
        }
    }
}

/// One thread's view of the team.
pub struct TeamCtx<'a> {
    index: usize,
    threads: usize,
    barrier: &'a Barrier,
}

impl TeamCtx<'_> {
    /// This thread's number, `0..threads()`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Number of threads in the team.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Waits until every thread of the team has called `wait` as often as this one (what each
    /// wrote before is then visible to all). An error when another thread's body failed.
    pub fn wait(&self) -> Result<()> {
        self.barrier.wait(&mut || false)
    }

    /// As [`TeamCtx::wait`], bringing the start of `next` (the weight bytes this thread reads
    /// first after the barrier) into its cache while it spins, so the memory bus keeps
    /// streaming weights while the team waits for its slowest member.
    pub fn wait_warming(&self, next: &[&[u8]]) -> Result<()> {
        let mut warm = Warmer::new(next);
        self.barrier.wait(&mut || warm.step())
    }

    /// This thread's contiguous share of `0..n`, in pieces aligned to `align` (the last share
    /// takes the remainder; a share may be empty when `n` is small).
    pub fn share(&self, n: usize, align: usize) -> Range<usize> {
        share(n, align, self.threads, self.index)
    }
}

/// Bytes warmed at most per wait: well inside a core's L2, so what is fetched is still there
/// when the kernel reads it.
const WARM_MAX: usize = 256 << 10;

/// Walks a few regions a few cache lines per step, asking for each line.
struct Warmer<'a> {
    regions: &'a [&'a [u8]],
    region: usize,
    at: usize,
    budget: usize,
}

impl<'a> Warmer<'a> {
    fn new(regions: &'a [&'a [u8]]) -> Self {
        Self {
            regions,
            region: 0,
            at: 0,
            budget: WARM_MAX,
        }
    }

    /// Asks for the next few lines; `false` when everything (or the budget) is asked for.
    fn step(&mut self) -> bool {
        const LINE: usize = 64;
        for _ in 0..4 {
            let Some(r) = self.regions.get(self.region) else {
                return false;
            };
            if self.budget < LINE {
                return false;
            }
            if self.at >= r.len() {
                self.region += 1;
                self.at = 0;
                continue;
            }
            super::prefetch_l2(r, self.at);
            self.at += LINE;
            self.budget -= LINE;
        }
        true
    }
}

/// Thread `index`'s share of `0..n` among `threads`, aligned to `align`.
pub fn share(n: usize, align: usize, threads: usize, index: usize) -> Range<usize> {
    let align = align.max(1);
    let step = n.div_ceil(threads.max(1)).div_ceil(align) * align;
    (index * step).min(n)..((index + 1) * step).min(n)
}

/// Runs `body` once on every thread of rayon's current pool and waits for all of them; the
/// first error (or a panic, as [`Error::Panicked`]) is returned.
pub fn run<F>(body: F) -> Result<()>
where
    F: Fn(&TeamCtx) -> Result<()> + Sync,
{
    let barrier = Barrier::new(rayon::current_num_threads());
    let results = rayon::broadcast(|ctx| {
        let team = TeamCtx {
            index: ctx.index(),
            threads: ctx.num_threads(),
            barrier: &barrier,
        };
        let result = match catch_unwind(AssertUnwindSafe(|| body(&team))) {
            Ok(r) => r,
            Err(payload) => Err(Error::Panicked(
                payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a thread of the team panicked".to_owned()),
            )),
        };
        if result.is_err() {
            barrier.abort();
        }
        result
    });
    // The thread that failed reports the cause; the others only saw the abort.
    let mut errors: Vec<Error> = results.into_iter().filter_map(Result::err).collect();
    let cause = errors
        .iter()
        .position(|e| !matches!(e, Error::Panicked(m) if m == RELEASED))
        .unwrap_or(0);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.swap_remove(cause))
    }
}

/// The pieces of one phase, handed out one at a time, remembering who took each for the
/// gather. Thread `me` of `threads` first takes its own pieces (`me`, `me + threads`, …: the
/// ones whose weights it warmed while waiting), then any piece still untaken (so a thread
/// that fell behind does fewer).
pub struct Claims {
    threads: usize,
    owners: Vec<AtomicUsize>,
}

/// The owner of a piece nobody took yet.
const FREE: usize = usize::MAX;

impl Claims {
    /// `pieces` pieces, none taken yet, shared by `threads` threads (0 counts as 1).
    pub fn new(pieces: usize, threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            owners: (0..pieces).map(|_| AtomicUsize::new(FREE)).collect(),
        }
    }

    /// The next piece, now owned by thread `me`; `None` when every piece is taken.
    pub fn take(&self, me: usize) -> Option<usize> {
        let n = self.owners.len();
        let own = (me % self.threads..n).step_by(self.threads);
        own.chain(0..n).find(|&i| {
            let owner = &self.owners[i];
            owner.load(Ordering::Relaxed) == FREE
                && owner
                    .compare_exchange(FREE, me, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// The pieces thread `me` took (read after the barrier that ends the phase).
    pub fn taken_by(&self, me: usize) -> impl Iterator<Item = usize> + '_ {
        self.owners
            .iter()
            .enumerate()
            .filter(move |(_, o)| o.load(Ordering::Relaxed) == me)
            .map(|(i, _)| i)
    }
}

/// Per-thread output slots, double-buffered by the parity of the barrier phase, so a thread
/// can publish its share of phase `p + 1` while slower threads still read phase `p`.
///
/// Each thread writes only its own slot (at the offsets of its share in the full vector) and,
/// after a barrier, reads every slot's share with [`Parts::gather`]. The locks are never
/// contended while the phases are respected.
pub struct Parts {
    slots: Vec<[Mutex<Vec<f32>>; 2]>,
}

fn lock(m: &Mutex<Vec<f32>>) -> MutexGuard<'_, Vec<f32>> {
    // A panic while holding a slot aborts the team; the data is rewritten before any use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Parts {
    /// Slots of `len` values for `threads` threads.
    pub fn new(threads: usize, len: usize) -> Self {
        Self {
            slots: (0..threads)
                .map(|_| [Mutex::new(vec![0.0; len]), Mutex::new(vec![0.0; len])])
                .collect(),
        }
    }

    /// Number of threads with a slot.
    pub fn threads(&self) -> usize {
        self.slots.len()
    }

    /// The values each slot holds.
    pub fn len(&self) -> usize {
        self.slots.first().map_or(0, |s| lock(&s[0]).len())
    }

    /// Whether the slots hold no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Thread `index`'s slot of phase `parity` for writing.
    pub fn slot(&self, index: usize, parity: usize) -> MutexGuard<'_, Vec<f32>> {
        lock(&self.slots[index][parity & 1])
    }

    /// Copies into `dst` every thread's values at `ranges(thread)` of phase `parity`.
    pub fn gather<I>(&self, parity: usize, dst: &mut [f32], ranges: impl Fn(usize) -> I)
    where
        I: IntoIterator<Item = Range<usize>>,
    {
        for (t, slot) in self.slots.iter().enumerate() {
            let src = lock(&slot[parity & 1]);
            for r in ranges(t) {
                dst[r.clone()].copy_from_slice(&src[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_range_once() {
        for n in [0, 1, 5, 16, 17, 896, 4864] {
            for threads in 1..5 {
                let mut next = 0;
                for i in 0..threads {
                    let r = share(n, 16, threads, i);
                    assert_eq!(r.start, next.min(n));
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn a_failing_thread_releases_the_others() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        let r = pool.install(|| {
            run(|t| {
                if t.index() == 1 {
                    return Err(Error::InvalidParameter("boom".to_owned()));
                }
                for _ in 0..3 {
                    t.wait()?;
                }
                Ok(())
            })
        });
        assert!(matches!(r, Err(Error::InvalidParameter(m)) if m == "boom"));
        let r = pool.install(|| {
            run(|t| {
                t.wait()?;
                assert!(t.index() != 2, "thread two gives up");
                t.wait()
            })
        });
        assert!(matches!(r, Err(Error::Panicked(m)) if m.contains("thread two")));
    }

    #[test]
    fn threads_that_wait_long_sleep_and_are_woken() {
        // A partner late by far more than the spin time: the others sleep on the condition
        // variable and every phase still completes in order, also when the late one fails.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        let seen = Mutex::new(Vec::new());
        pool.install(|| {
            run(|t| {
                for phase in 0..4 {
                    if t.index() == phase % 3 {
                        std::thread::sleep(Duration::from_millis(3));
                    }
                    t.wait()?;
                    seen.lock().expect("lock").push(phase);
                    t.wait()?;
                }
                Ok(())
            })
        })
        .expect("team");
        let seen = seen.into_inner().expect("lock");
        assert_eq!(seen.len(), 12);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");

        let r = pool.install(|| {
            run(|t| {
                if t.index() == 0 {
                    std::thread::sleep(Duration::from_millis(3));
                    return Err(Error::InvalidParameter("late and failing".to_owned()));
                }
                t.wait()
            })
        });
        assert!(matches!(r, Err(Error::InvalidParameter(_))));
    }

    #[test]
    fn claims_hand_out_every_piece_once() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        let claims = Claims::new(40, 3);
        let done = Mutex::new(Vec::new());
        pool.install(|| {
            run(|t| {
                while let Some(i) = claims.take(t.index()) {
                    done.lock().expect("lock").push((i, t.index()));
                }
                t.wait()
            })
        })
        .expect("team");
        let mut done = done.into_inner().expect("lock");
        done.sort_unstable();
        assert_eq!(
            done.iter().map(|d| d.0).collect::<Vec<_>>(),
            (0..40).collect::<Vec<_>>()
        );
        for (i, who) in done {
            assert!(claims.taken_by(who).any(|p| p == i));
        }
    }

    #[test]
    fn claims_give_each_thread_its_own_pieces_first() {
        // 2 threads, 5 pieces: thread 1's own are 1 and 3; then the lowest untaken.
        let claims = Claims::new(5, 2);
        assert_eq!(claims.take(1), Some(1));
        assert_eq!(claims.take(1), Some(3));
        assert_eq!(claims.take(0), Some(0));
        assert_eq!(claims.take(1), Some(2));
        assert_eq!(claims.take(0), Some(4));
        assert_eq!(claims.take(0), None);
        assert_eq!(claims.taken_by(1).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn a_warming_wait_still_meets_the_others() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let weights = vec![7u8; 1 << 20];
        let seen = Mutex::new(Vec::new());
        pool.install(|| {
            run(|t| {
                for phase in 0..3 {
                    if t.index() == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    t.wait_warming(&[&weights[..1000], &weights[4096..]])?;
                    seen.lock().expect("lock").push(phase);
                    t.wait()?;
                }
                Ok(())
            })
        })
        .expect("team");
        let seen = seen.into_inner().expect("lock");
        assert_eq!(seen, [0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn phases_see_every_share() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        let n = 50;
        let parts = Parts::new(3, n);
        let sums = Mutex::new(Vec::new());
        pool.install(|| {
            run(|t| {
                let mut full = vec![0.0; n];
                for phase in 0..6 {
                    {
                        let mut slot = parts.slot(t.index(), phase);
                        for j in t.share(n, 4) {
                            slot[j] = (phase * 100 + j) as f32;
                        }
                    }
                    t.wait()?;
                    parts.gather(phase, &mut full, |i| [share(n, 4, 3, i)]);
                    let want: Vec<f32> = (0..n).map(|j| (phase * 100 + j) as f32).collect();
                    assert_eq!(full, want);
                }
                sums.lock().expect("lock").push(t.index());
                Ok(())
            })
        })
        .expect("team");
        let mut who = sums.into_inner().expect("lock");
        who.sort_unstable();
        assert_eq!(who, vec![0, 1, 2]);
    }
}
