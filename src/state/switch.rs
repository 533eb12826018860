//! The switch record: which server the applications' transactions go to, and the epoch of the
//! switch that said so. Part of the migration's state (the coordinator writes it at the commit
//! point of a cutover or rollback); the proxy keeps a copy of its own and takes the higher
//! epoch of the two (`proxy::backend`).

use serde::{Deserialize, Serialize};

use crate::pg::Side;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    pub backend: Side,
    pub epoch: u64,
}

impl Default for Switch {
    fn default() -> Self {
        Switch {
            backend: Side::Source,
            epoch: 0,
        }
    }
}
