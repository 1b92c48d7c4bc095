//! What can go wrong in the coordinator, and the gRPC code each failure is answered with, so that a client
//! can tell "retry" (UNAVAILABLE, ABORTED) from "your request is wrong" (INVALID_ARGUMENT, NOT_FOUND,
//! FAILED_PRECONDITION) from "the stored state is damaged" (DATA_LOSS) and "a bug" (INTERNAL).

use std::time::Duration;

use tonic::{Code, Status};

use cellfleet_shared::ids::{Generation, JobId, Rank, ScreenId, WorkerId};

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The metadata store did not answer or failed the request; the same request may succeed later.
    #[error("metadata store: {0}")]
    Store(#[source] cellfleet_shared::Error),
    /// A compare-and-swap lost to a concurrent writer; the request may be repeated as it is.
    #[error("{0}")]
    Conflict(String),

    #[error("unknown job {:?}", .0.as_str())]
    UnknownJob(JobId),
    #[error("unknown screen {:?}", .0.as_str())]
    UnknownScreen(ScreenId),
    #[error(
        "worker {worker} is not a member (its lease lapsed after {:.1}s without a heartbeat, or it never registered); register again",
        .lease_ttl.as_secs_f64()
    )]
    NotAMember {
        worker: WorkerId,
        lease_ttl: Duration,
    },

    /// The request itself is malformed (the message names the field and what was expected).
    #[error("{0}")]
    InvalidRequest(String),

    #[error("job {job} is at generation {current}; generation {asked} was superseded (await the new assignment)")]
    SupersededGeneration {
        job: JobId,
        current: Generation,
        asked: Generation,
    },
    #[error("job {job} is at generation {current}; generation {asked} does not exist")]
    NoSuchGeneration {
        job: JobId,
        current: Generation,
        asked: Generation,
    },
    #[error("job {job} is {state}")]
    JobNotRunning { job: JobId, state: &'static str },
    #[error("job {job} is already {state}")]
    JobEnded { job: JobId, state: &'static str },
    #[error("screen {screen} is already {state}")]
    ScreenEnded {
        screen: ScreenId,
        state: &'static str,
    },
    #[error("worker {worker} is not rank {rank} of job {job} generation {generation}")]
    NotRank {
        worker: WorkerId,
        rank: Rank,
        job: JobId,
        generation: Generation,
    },

    /// A rendezvous key nobody set in time (a peer that never arrived).
    #[error("key {key:?} of job {job} generation {generation} was not set within {timeout_ms} ms")]
    KeyNotSet {
        key: String,
        job: JobId,
        generation: Generation,
        timeout_ms: u64,
    },

    /// A stored record that does not parse or breaks an invariant: retrying will not help, the store needs
    /// a person.
    #[error("{store}: stored {key} is unreadable: {why}")]
    Corrupt {
        store: String,
        key: String,
        why: String,
    },
    /// A bug in the coordinator.
    #[error("{0}")]
    Internal(String),
}

impl CoordinatorError {
    /// A failed metadata-store call. The stores report their failures as `Error::Meta`; any other error
    /// from them is a bug.
    pub fn store(e: cellfleet_shared::Error) -> Self {
        use cellfleet_shared::Error as E;
        match e {
            E::Meta { .. } => Self::Store(e),
            E::BadUrl { .. }
            | E::Store { .. }
            | E::NoManifest { .. }
            | E::BadManifest { .. }
            | E::CorruptShard { .. }
            | E::HashMismatch { .. }
            | E::SizeMismatch { .. }
            | E::Compression(_)
            | E::Config(_)
            | E::Loader(_)
            | E::BadSafetensors { .. }
            | E::SafetensorsLayout(_) => Self::Internal(format!(
                "the metadata store failed with a non-store error: {e}"
            )),
        }
    }

    /// The gRPC code a client receives for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::Store(_) => Code::Unavailable,
            Self::Conflict(_) => Code::Aborted,
            Self::UnknownJob(_) | Self::UnknownScreen(_) | Self::NotAMember { .. } => {
                Code::NotFound
            }
            Self::InvalidRequest(_) => Code::InvalidArgument,
            Self::SupersededGeneration { .. }
            | Self::NoSuchGeneration { .. }
            | Self::JobNotRunning { .. }
            | Self::JobEnded { .. }
            | Self::ScreenEnded { .. }
            | Self::NotRank { .. } => Code::FailedPrecondition,
            Self::KeyNotSet { .. } => Code::DeadlineExceeded,
            Self::Corrupt { .. } => Code::DataLoss,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_messages_and_get_their_codes() {
        let cases = [
            (
                CoordinatorError::store(cellfleet_shared::Error::Meta {
                    store: "memory".into(),
                    why: "down".into(),
                }),
                Code::Unavailable,
                "metadata store: metadata store memory: down",
            ),
            (
                CoordinatorError::store(cellfleet_shared::Error::Config("x".into())),
                Code::Internal,
                "the metadata store failed with a non-store error: invalid stream setting: x",
            ),
            (
                CoordinatorError::UnknownJob("job-nope".into()),
                Code::NotFound,
                "unknown job \"job-nope\"",
            ),
            (
                CoordinatorError::NoSuchGeneration {
                    job: "job-1".into(),
                    current: Generation(0),
                    asked: Generation(7),
                },
                Code::FailedPrecondition,
                "job job-1 is at generation 0; generation 7 does not exist",
            ),
            (
                CoordinatorError::Corrupt {
                    store: "memory".into(),
                    key: "jobs/job-1".into(),
                    why: "expected value".into(),
                },
                Code::DataLoss,
                "memory: stored jobs/job-1 is unreadable: expected value",
            ),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
