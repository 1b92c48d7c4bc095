//! Identifiers as types: a job, a worker, a screen, a generation of a job, a rank in a generation, an
//! optimizer step. Each is stored and sent as its plain value (`serde(transparent)`: a stored record reads
//! `"id":"job-1"`, not `"id":{"0":"job-1"}`), so records and the protocol keep their format, while the
//! compiler keeps a worker id from being passed where a job id is expected.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Maps keyed by the id can be searched with a `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

macro_rules! number_id {
    ($(#[$doc:meta])* $name:ident($int:ty)) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $int);

        impl $name {
            pub fn get(self) -> $int {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$int> for $name {
            fn from(n: $int) -> Self {
                Self(n)
            }
        }

        impl From<$name> for $int {
            fn from(n: $name) -> $int {
                n.0
            }
        }
    };
}

string_id!(
    /// A training job (`job-<unix ms>`), named by the coordinator at submission.
    JobId
);
string_id!(
    /// A worker process (`<host>-<pid>-<nonce>`), named by the coordinator at registration.
    WorkerId
);
string_id!(
    /// A perturbation screen (`screen-<unix ms>`), named by the coordinator at submission.
    ScreenId
);
number_id!(
    /// A job's generation: one membership of its ranks. 0 before the first is formed; every re-formation
    /// (a lost or added worker) starts the next.
    Generation(u64)
);
number_id!(
    /// A worker's place in one generation (0 is the one that writes models and checkpoints).
    Rank(u32)
);
number_id!(
    /// Optimizer steps completed (1 after the first step).
    Step(u64)
);

impl Generation {
    /// The generation formed after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl Rank {
    /// The rank as an index into a generation's members (which are in rank order).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn ids_serialize_as_their_plain_values() {
        assert_eq!(
            serde_json::to_string(&JobId::from("job-1")).unwrap(),
            "\"job-1\""
        );
        assert_eq!(serde_json::to_string(&Generation(7)).unwrap(), "7");
        let back: Vec<WorkerId> = serde_json::from_str(r#"["a","b"]"#).unwrap();
        assert_eq!(back, [WorkerId::from("a"), WorkerId::from("b")]);
        let rank: Rank = serde_json::from_str("3").unwrap();
        assert_eq!((rank, rank.index()), (Rank(3), 3));
    }

    #[test]
    fn ids_display_plainly_and_look_up_by_str() {
        let id = ScreenId::from("screen-5");
        assert_eq!(
            format!("{id} {} {}", Generation(2), Step(10)),
            "screen-5 2 10"
        );
        let map: BTreeMap<ScreenId, u32> = [(id, 1)].into();
        assert_eq!(map.get("screen-5"), Some(&1));
        assert_eq!(Generation(1).next(), Generation(2));
    }
}
