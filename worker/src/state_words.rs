//! The words people and scripts read for job and screen states (`cellfleet job status`, `screen status
//! --json`): the lowercase words the coordinator stores, not the protocol's enum names.

use cellfleet_proto as pb;

pub trait StateWord {
    fn word(self) -> &'static str;
}

impl StateWord for pb::JobState {
    fn word(self) -> &'static str {
        match self {
            pb::JobState::Unspecified => "unknown",
            pb::JobState::Pending => "pending",
            pb::JobState::Running => "running",
            pb::JobState::Completed => "completed",
            pb::JobState::Failed => "failed",
            pb::JobState::Cancelled => "cancelled",
        }
    }
}

impl StateWord for pb::ScreenState {
    fn word(self) -> &'static str {
        match self {
            pb::ScreenState::Unspecified => "unknown",
            pb::ScreenState::Running => "running",
            pb::ScreenState::Completed => "completed",
            pb::ScreenState::Failed => "failed",
            pb::ScreenState::Cancelled => "cancelled",
        }
    }
}
