//! Protocol and domain logic with no I/O and no clock.
//!
//! Everything here takes the current time as a value and returns decisions,
//! so it can be tested exhaustively without sockets or sleeps. Nothing in this
//! module may read the system clock, touch the network or the disk, or spawn
//! tasks.

pub mod bulk;
pub mod channel_uri;
pub mod ids;
pub mod lifecycle;
pub mod partition;
pub mod record;
pub mod refresh;
pub mod syncml;
pub mod time;
pub mod wns;

pub use channel_uri::{ChannelUri, ChannelUriError, UriPolicy};
pub use ids::{DeviceId, IdError, Pfn, ProviderId};
pub use lifecycle::{DeadReason, LeaveReason, LifecycleState, Thresholds};
pub use partition::Partitioning;
pub use record::{
    merge_registration, DeadMark, DeviceRecord, RefreshMark, RefreshState, Registration,
};
pub use refresh::{
    pfn_to_send, Change, CompleteOutcome, Handout, Job, JobId, JobState, PfnChoice, QueueError,
    QueueStats, RefreshPolicy, RefreshQueue,
};
pub use syncml::{pfn_replacement, PfnCommand, PfnVerb, SyncmlFragment};
pub use time::UnixTime;
