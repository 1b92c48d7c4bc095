//! The words people and scripts read for job and screen states (`cellfleet job status`, `screen status
//! --json`): the coordinator's own names for its states (what it stores), not the protocol's enum names.

use cellfleet_coordinator::{JobState, ScreenState};
use cellfleet_proto as pb;

pub trait StateWord {
    fn word(self) -> &'static str;
}

impl StateWord for pb::JobState {
    fn word(self) -> &'static str {
        JobState::from_proto(self).map_or("unknown", JobState::name)
    }
}

impl StateWord for pb::ScreenState {
    fn word(self) -> &'static str {
        ScreenState::from_proto(self).map_or("unknown", ScreenState::name)
    }
}
