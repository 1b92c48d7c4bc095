//! One rule for every call a worker or client makes to the coordinator: which answers are worth asking
//! again, how long to wait between attempts, and when to give up.
//!
//! * **Retryable** codes say the coordinator could not answer *now*: it is restarting or unreachable
//!   (UNAVAILABLE, and CANCELLED / UNKNOWN / INTERNAL, which is how a connection that breaks mid-call
//!   surfaces in HTTP/2), too slow (DEADLINE_EXCEEDED), busy (RESOURCE_EXHAUSTED), or lost a race with a
//!   concurrent writer of the metadata store (ABORTED).
//! * **Final** codes are an answer: the request is wrong (INVALID_ARGUMENT, OUT_OF_RANGE), names something
//!   that does not exist (NOT_FOUND, ALREADY_EXISTS), comes too late for the current state
//!   (FAILED_PRECONDITION: a superseded generation, a finished job), is not allowed (PERMISSION_DENIED,
//!   UNAUTHENTICATED), cannot be served (UNIMPLEMENTED), or a stored record is corrupt (DATA_LOSS, which
//!   asking again cannot heal).
//!
//! Waits grow exponentially from `first_delay` to `max_delay` with jitter (each wait is drawn between half
//! and all of its nominal length), so the workers of a fleet that lost the coordinator together do not
//! come back in lockstep. The jitter is not part of any run's reproducible randomness.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::{Code, Status};

/// Whether asking again can change the answer `code`.
pub fn is_retryable(code: Code) -> bool {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::DataLoss => false,
    }
}

/// Why a call with retries did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The coordinator answered with a final code.
    #[error("{}", explain(.0))]
    Refused(Status),
    /// Retryable failures went on past the policy's bound; the last one is kept.
    #[error("no answer from the coordinator for {:.0}s: {}", .after.as_secs_f64(), explain(.last))]
    GaveUp { last: Status, after: Duration },
}

/// A status's message, with what an obscure transport error usually means.
pub fn explain(status: &Status) -> String {
    let message = status.message();
    // What a plaintext HTTP/2 client sees from a TLS server varies with timing: a protocol error, the
    // connection dropped under the call, or a bare transport error. These are tonic's words, never the
    // coordinator's, so the (conditional) hint is only added to a connection-level failure.
    let plaintext_to_tls = [
        "h2 protocol error",
        "operation was canceled",
        "connection closed",
        "transport error",
    ];
    if plaintext_to_tls.iter().any(|m| message.contains(m)) {
        format!("{message} (if the coordinator serves TLS: use an https:// URL and --tls-ca)")
    } else {
        message.to_string()
    }
}

impl CallError {
    /// The coordinator's last answer.
    pub fn status(&self) -> &Status {
        match self {
            CallError::Refused(status) => status,
            CallError::GaveUp { last, .. } => last,
        }
    }
}

/// Exponential backoff with jitter, bounded by the time since the first failure.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Give up when failures have gone on this long (measured from the first failed attempt).
    pub give_up_after: Duration,
}

impl RetryPolicy {
    /// For calls that must get through a coordinator restart: waits from 100 ms up to 2 s between
    /// attempts, for at most `give_up_after`.
    pub const fn through_restarts(give_up_after: Duration) -> Self {
        Self {
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            give_up_after,
        }
    }

    /// The wait before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self
            .first_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        nominal.mul_f64(0.5 + 0.5 * jitter())
    }

    /// The decision after a failed attempt: `Ok(wait)` to try again after `wait`, or the error to return.
    fn next(
        &self,
        status: Status,
        attempt: u32,
        failing_since: Instant,
    ) -> Result<Duration, CallError> {
        if !is_retryable(status.code()) {
            return Err(CallError::Refused(status));
        }
        let after = failing_since.elapsed();
        if after >= self.give_up_after {
            return Err(CallError::GaveUp {
                last: status,
                after,
            });
        }
        Ok(self.delay(attempt))
    }

    /// Makes `call` until it succeeds, fails with a final code, or retryable failures outlast the bound.
    pub fn run<T>(&self, mut call: impl FnMut() -> Result<T, Status>) -> Result<T, CallError> {
        let mut failing_since = None;
        for attempt in 0.. {
            match call() {
                Ok(answer) => return Ok(answer),
                Err(status) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    std::thread::sleep(self.next(status, attempt, since)?);
                }
            }
        }
        unreachable!("the attempt counter is unbounded")
    }

    /// [`RetryPolicy::run`] for async calls.
    pub async fn run_async<T, F, Fut>(&self, mut call: F) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut failing_since = None;
        for attempt in 0.. {
            match call().await {
                Ok(answer) => return Ok(answer),
                Err(status) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    tokio::time::sleep(self.next(status, attempt, since)?).await;
                }
            }
        }
        unreachable!("the attempt counter is unbounded")
    }
}

/// A number in [0, 1) that differs between processes and calls (xorshift over the clock and the pid).
fn jitter() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            (nanos ^ (u64::from(std::process::id()) << 32)) | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const FAST: RetryPolicy = RetryPolicy {
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(4),
        give_up_after: Duration::from_millis(200),
    };

    #[test]
    fn final_codes_are_returned_at_once() {
        for code in [
            Code::NotFound,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::DataLoss,
        ] {
            let calls = Cell::new(0);
            let result: Result<(), _> = FAST.run(|| {
                calls.set(calls.get() + 1);
                Err(Status::new(code, "no"))
            });
            assert!(matches!(result, Err(CallError::Refused(ref s)) if s.code() == code));
            assert_eq!(calls.get(), 1, "{code:?} was retried");
        }
    }

    #[test]
    fn retryable_codes_are_retried_until_an_answer() {
        let calls = Cell::new(0);
        let answer = FAST.run(|| {
            calls.set(calls.get() + 1);
            if calls.get() < 4 {
                Err(Status::unavailable("restarting"))
            } else {
                Ok(7)
            }
        });
        assert_eq!(answer.unwrap(), 7);
        assert_eq!(calls.get(), 4);
    }

    #[test]
    fn retries_stop_at_the_bound_with_the_last_answer() {
        let result: Result<(), _> = FAST.run(|| Err(Status::aborted("lost a race")));
        match result {
            Err(CallError::GaveUp { last, after }) => {
                assert_eq!(last.code(), Code::Aborted);
                assert!(after >= FAST.give_up_after);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let policy = RetryPolicy::through_restarts(Duration::from_secs(60));
        for attempt in 0..20 {
            let nominal = (policy.first_delay * (1 << attempt.min(16))).min(policy.max_delay);
            let d = policy.delay(attempt);
            assert!(d >= nominal / 2 && d <= nominal, "attempt {attempt}: {d:?}");
        }
        let draws: Vec<Duration> = (0..32).map(|_| policy.delay(10)).collect();
        assert!(draws.iter().any(|d| *d != draws[0]), "no jitter: {draws:?}");
    }
}
