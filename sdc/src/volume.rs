//! Maps a volume's byte range onto chunks and placement groups, from a cached cluster map.
//! Pure: no I/O.

use proto::model::{ClusterState, PgMapping, StoragePool, Volume};
use proto::{ChunkId, ChunkIndex, Epoch, PgId, CHUNK_SIZE};

/// One piece of a request, inside one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub chunk: ChunkId,
    /// Offset inside the chunk.
    pub offset: u32,
    pub len: u32,
    /// Offset of this piece inside the request.
    pub buf_offset: usize,
}

/// Split `[offset, offset + len)` at chunk boundaries.
pub fn split(vol: &Volume, offset: u64, len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let index = pos / CHUNK_SIZE;
        let in_chunk = pos % CHUNK_SIZE;
        let n = (CHUNK_SIZE - in_chunk).min(end - pos);
        out.push(Piece {
            chunk: ChunkId::new(vol.vtree, ChunkIndex(index)).in_layer(vol.layer),
            offset: in_chunk as u32,
            len: n as u32,
            buf_offset: (pos - offset) as usize,
        });
        pos += n;
    }
    out
}

/// Where a chunk lives now: its pool's epoch, its PG and the PG's copies.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub epoch: Epoch,
    pub pg: PgId,
    pub mapping: PgMapping,
}

pub fn route(pool: &StoragePool, chunk: ChunkId) -> Option<Route> {
    let pg = chunk.pg(pool.pg_count);
    pool.pg(pg).map(|m| Route {
        epoch: pool.epoch,
        pg,
        mapping: *m,
    })
}

/// The volume and pool of `name` in `map`.
pub fn lookup(map: &ClusterState, volume: proto::VolumeId) -> Option<(&Volume, &StoragePool)> {
    let v = map.volumes.get(&volume)?;
    let p = map.pools.get(&v.pool)?;
    Some((v, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::*;

    fn vol() -> Volume {
        Volume {
            id: VolumeId(1),
            name: "v".into(),
            pool: PoolId(1),
            size_bytes: 8 << 20,
            thin: true,
            vtree: VtreeId(9),
            created_unix: 0,
            labels: Default::default(),
            preempt: false,
            layer: Default::default(),
            snapshot: None,
        }
    }

    #[test]
    fn splits_at_chunk_boundaries() {
        let p = split(&vol(), CHUNK_SIZE - 4096, 8192 + CHUNK_SIZE);
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].chunk.index.0, p[0].offset, p[0].len, p[0].buf_offset),
            (0, (CHUNK_SIZE - 4096) as u32, 4096, 0)
        );
        assert_eq!(
            (p[1].chunk.index.0, p[1].offset, p[1].len, p[1].buf_offset),
            (1, 0, CHUNK_SIZE as u32, 4096)
        );
        assert_eq!((p[2].chunk.index.0, p[2].offset, p[2].len), (2, 0, 4096));
        assert!(split(&vol(), 0, 0).is_empty());
    }
}
