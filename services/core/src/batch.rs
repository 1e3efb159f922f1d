//! What names one committed edge batch: the gateway's spool and the last sequence number the commit covered. The
//! link that committed it, the store's list of batches still to score and the scorer that confirms them all use it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One committed group of a gateway spool's records (sequence numbers count within a spool, so the last one names
/// the commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchKey {
    pub gateway_id: Uuid,
    pub spool_id: Uuid,
    pub last_sequence: u64,
}
