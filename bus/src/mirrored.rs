//! How far a region delivered the copies MirrorMaker 2 makes of other regions' channels: for each source region and
//! channel, the last sequence this region's routers handed to its gateways. A region moving a channel's home to
//! itself waits until it delivered everything the old home ordered ([`MirrorPositions::position`]). The Redis driver
//! is [`crate::redis::RedisMirrorPositions`]; [`MemoryMirrorPositions`] serves one process.

use async_trait::async_trait;
use parley_api::BackendError;
use std::collections::HashMap;
use std::sync::Mutex;

/// The mirrored positions of a region.
#[async_trait]
pub trait MirrorPositions: Send + Sync + std::fmt::Debug + 'static {
    /// Records that these channels of `source` were delivered up to these sequences (a position never moves back).
    async fn record(&self, source: &str, positions: Vec<(String, u64)>) -> Result<(), BackendError>;
    /// The last sequence of `source`'s `channel` delivered here (0: none).
    async fn position(&self, source: &str, channel: &str) -> Result<u64, BackendError>;
}

/// Positions in memory.
#[derive(Debug, Default)]
pub struct MemoryMirrorPositions {
    positions: Mutex<HashMap<(String, String), u64>>,
}

#[async_trait]
impl MirrorPositions for MemoryMirrorPositions {
    async fn record(&self, source: &str, positions: Vec<(String, u64)>) -> Result<(), BackendError> {
        let mut known = self.positions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (channel, seq) in positions {
            let entry = known.entry((source.to_owned(), channel)).or_default();
            *entry = (*entry).max(seq);
        }
        Ok(())
    }

    async fn position(&self, source: &str, channel: &str) -> Result<u64, BackendError> {
        let known = self.positions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(known.get(&(source.to_owned(), channel.to_owned())).copied().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn positions_only_move_forward() {
        let positions = MemoryMirrorPositions::default();
        positions.record("eu", vec![("g:a".into(), 5), ("g:b".into(), 2)]).await.expect("record");
        positions.record("eu", vec![("g:a".into(), 3)]).await.expect("record");
        assert_eq!(positions.position("eu", "g:a").await.expect("read"), 5);
        assert_eq!(positions.position("eu", "g:b").await.expect("read"), 2);
        assert_eq!(positions.position("us", "g:a").await.expect("read"), 0);
    }
}
