//! Rebuild's side of the data service: the primary copies a chunk onto its rebuilding target
//! under the chunk's whole range lock (`copy_chunk`), asks the target which chunks it already
//! holds (`remote_allocation`), and makes what it copied durable there before the rebuild of
//! the PG is reported (`flush_peer`). The rebuild driver ([`crate::rebuild`]) calls these.

use super::*;

impl<D: BlockDevice> Service<D> {
    /// Rebuild: make `target`'s copy of `chunk` equal to this primary's, under the chunk's
    /// whole range lock so no user write interleaves. `target_has` says whether the target
    /// holds the chunk (a chunk neither holds needs nothing). Returns the bytes copied.
    pub async fn copy_chunk(
        &self,
        pool: proto::PoolId,
        pg: proto::PgId,
        chunk: proto::ChunkId,
        target: proto::SdsId,
        target_has: bool,
    ) -> Result<u64, WireError> {
        let _order = self.order.lock(chunk, BlockMask::all()).await;
        let epoch = self
            .map
            .state()
            .pools
            .get(&pool)
            .map(|p| p.epoch)
            .unwrap_or_default();
        let h = DataHeader {
            flags: proto::data::FLAG_COPY,
            ..DataHeader::at(
                DataOp::ReplicaWrite,
                pool,
                pg,
                epoch,
                chunk,
                0,
                proto::CHUNK_SIZE as u32,
            )
        };
        let route = self.map.check(&h, Role::Primary).map_err(refusal)?;
        let addr = match route.secondary {
            Some((s, addr)) if s == target => addr,
            _ => {
                return Err(WireError::new(
                    ErrorCode::StaleEpoch,
                    format!("SDS {target} is no longer the secondary of PG {pg}"),
                ))
            }
        };
        let (h, data) = if self.storage.contains(chunk) {
            let data = self
                .storage
                .read(chunk, 0, proto::CHUNK_SIZE as u32)
                .await
                .map_err(|e| self.store_error(e))?;
            (h, data)
        } else if target_has {
            (
                DataHeader {
                    op: DataOp::ReplicaTrim,
                    ..h
                },
                Bytes::new(),
            )
        } else {
            return Ok(0);
        };
        let n = data.len() as u64;
        self.replicas
            .forward(target, addr, &h, data)
            .await
            .map_err(|e| self.forward_error(e))?;
        self.metrics.rebuild_chunks.inc();
        self.metrics.rebuild_bytes.inc_by(n);
        Ok(n)
    }

    /// Ask `target` which chunks `first .. first + count` (of `first`'s tree and layer) it
    /// holds (one byte each).
    pub async fn remote_allocation(
        &self,
        target: proto::SdsId,
        pool: proto::PoolId,
        first: proto::ChunkId,
        count: u32,
    ) -> Result<Bytes, WireError> {
        let map = self.map.state();
        let addr = map
            .sds
            .get(&target)
            .and_then(|x| x.addr.parse().ok())
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::Unavailable,
                    format!("SDS {target} has no address"),
                )
            })?;
        let h = DataHeader {
            op: DataOp::AllocStatus,
            flags: 0,
            pool,
            pg: proto::PgId(0),
            epoch: map.pools.get(&pool).map(|p| p.epoch).unwrap_or_default(),
            chunk: first,
            offset: 0,
            len: count,
            fence: 0,
        };
        self.replicas
            .call(target, addr, &h)
            .await
            .map_err(|e| self.forward_error(e))
    }

    /// Make what this SDS wrote to SDS `target` durable there (a rebuild copy, before it is
    /// reported done).
    pub async fn flush_peer(&self, target: proto::SdsId) -> Result<(), WireError> {
        let map = self.map.state();
        let Some(addr) = map.sds.get(&target).and_then(|x| x.addr.parse().ok()) else {
            return Err(WireError::new(
                ErrorCode::Unavailable,
                format!("SDS {target} has no address in the map"),
            ));
        };
        let h = DataHeader::flush();
        self.replicas
            .call(target, addr, &h)
            .await
            .map(|_| ())
            .map_err(|e| self.forward_error(e))
    }
}
