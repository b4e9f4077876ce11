//! Repairs: a block that fails its checksum is rewritten from the PG's other copy, and a read
//! that meets a failed device is served from it. The primary repairs its own copy
//! (`read_repairing`, `repair_local`) and answers a secondary's request for its copy of a block
//! (`serve_repair`); a secondary asks the primary (`request_repair`, `repair_block`). With no
//! good copy the answer is `Checksum`, never wrong data.

use super::*;

impl<D: BlockDevice> Service<D> {
    /// A primary read; a block failing its checksum is repaired from the secondary and the
    /// read retried. With no good copy the read fails with `Checksum` (never wrong data). A
    /// read that meets a failed device is served from the secondary's copy.
    pub(super) async fn read_repairing(&self, h: &DataHeader) -> Result<Bytes, WireError> {
        // Each round repairs one block; a chunk has BLOCKS of them.
        for _ in 0..=crate::range_lock::BLOCKS {
            self.metrics.reads.inc();
            self.metrics.read_bytes.inc_by(u64::from(h.len));
            match self.storage.read(h.chunk, h.offset, h.len).await {
                Err(StoreError::ChecksumMismatch { chunk, offset }) => {
                    self.metrics.checksum_errors.inc();
                    self.repair_local(h.pool, h.pg, chunk, offset).await?;
                }
                Err(StoreError::Device(e)) if e.is_device_failure() => {
                    self.metrics.device_errors.inc();
                    return self.read_other_copy(h, &e.to_string()).await;
                }
                r => return r.map_err(|e| self.store_error(e)),
            }
        }
        Err(WireError::new(
            ErrorCode::Checksum,
            "repairs did not converge",
        ))
    }

    /// The PG's in-sync secondary (not this SDS), its address and the pool's epoch; or why
    /// there is none.
    fn other_copy(
        &self,
        pool: proto::PoolId,
        pg: proto::PgId,
    ) -> Result<(proto::SdsId, std::net::SocketAddr, proto::Epoch), String> {
        let map = self.map.state();
        let Some(p) = map.pools.get(&pool) else {
            return Err("its pool is not in the map".into());
        };
        let secondary = p
            .pg(pg)
            .and_then(PgMapping::in_sync_secondary)
            .filter(|s| Some(*s) != self.map.me());
        let Some(secondary) = secondary else {
            return Err("the PG has no in-sync second copy".into());
        };
        let Some(addr) = map.sds.get(&secondary).and_then(|x| x.addr.parse().ok()) else {
            return Err(format!("SDS {secondary} has no address"));
        };
        Ok((secondary, addr, p.epoch))
    }

    /// As the PG's primary whose own copy sits on a failed device, read the range from the
    /// in-sync secondary under the blocks' write-order lock (so no write of them is half
    /// applied there). Without one, the read fails with `Io`.
    pub(super) async fn read_other_copy(
        &self,
        h: &DataHeader,
        why: &str,
    ) -> Result<Bytes, WireError> {
        let lost = |more: String| {
            WireError::new(
                ErrorCode::Io,
                format!(
                    "this SDS's copy of chunk {} is on a failed device ({why}) and {more}",
                    h.chunk
                ),
            )
        };
        let (secondary, addr, epoch) = self.other_copy(h.pool, h.pg).map_err(lost)?;
        let _order = self
            .order
            .lock(h.chunk, BlockMask::bytes(h.offset, h.len))
            .await;
        let r = DataHeader::at(
            DataOp::ReadLocal,
            h.pool,
            h.pg,
            epoch,
            h.chunk,
            h.offset,
            h.len,
        );
        match self.replicas.call(secondary, addr, &r).await {
            Ok(d) if d.len() == h.len as usize => {
                self.metrics.reads_from_other_copy.inc();
                Ok(d)
            }
            Ok(d) => Err(lost(format!("the secondary sent {} bytes", d.len()))),
            Err(e) => Err(self.forward_error(e)),
        }
    }

    /// As the PG's primary, replace this SDS's block at `offset` of `chunk` (which failed its
    /// checksum) with the in-sync secondary's copy, under the block's write-order lock.
    pub async fn repair_local(
        &self,
        pool: proto::PoolId,
        pg: proto::PgId,
        chunk: proto::ChunkId,
        offset: u32,
    ) -> Result<(), WireError> {
        let block = offset / BLOCK_BYTES * BLOCK_BYTES;
        let _order = self
            .order
            .lock(chunk, BlockMask::bytes(block, BLOCK_BYTES))
            .await;
        let unrecoverable = |why: String| {
            self.metrics.unrecoverable_blocks.inc();
            tracing::error!(%chunk, offset = block, "block failed its checksum and cannot be repaired: {why}");
            WireError::new(
                ErrorCode::Checksum,
                format!("block at {block} of chunk {chunk} failed its checksum and no good copy is left: {why}"),
            )
        };
        let (secondary, addr, epoch) = self.other_copy(pool, pg).map_err(unrecoverable)?;
        let h = DataHeader::at(
            DataOp::ReadLocal,
            pool,
            pg,
            epoch,
            chunk,
            block,
            BLOCK_BYTES,
        );
        let good = match self.replicas.call(secondary, addr, &h).await {
            Ok(d) if d.len() == BLOCK_BYTES as usize => d,
            Ok(d) => {
                return Err(unrecoverable(format!(
                    "the secondary sent {} bytes",
                    d.len()
                )))
            }
            // The other copy is bad too (or its device failed): nothing left to repair from.
            Err(ForwardError::Refused { error, .. })
                if matches!(error.code, ErrorCode::Checksum | ErrorCode::Io) =>
            {
                return Err(unrecoverable(format!("the secondary's copy: {error}")))
            }
            // The secondary could not be asked right now (unreachable, busy, a newer map): the
            // block is not lost, so the client retries (and the read repairs it then).
            Err(e) => {
                tracing::warn!(%chunk, offset = block, %secondary, "cannot repair a block from the secondary yet: {e}");
                return Err(self.forward_error(e));
            }
        };
        self.storage
            .write(chunk, block, &good)
            .await
            .map_err(|e| self.store_error(e))?;
        self.metrics.repaired_blocks.inc();
        tracing::warn!(%chunk, offset = block, from = %secondary, "repaired a block that failed its checksum from the other copy");
        Ok(())
    }

    /// As the PG's primary, answer a secondary's repair request: send it this SDS's copy of the
    /// blocks as a ReplicaWrite, under the blocks' write-order lock so no user write of them
    /// interleaves.
    pub(super) async fn serve_repair(&self, h: &DataHeader) -> Result<(), WireError> {
        if !h.offset.is_multiple_of(BLOCK_BYTES)
            || h.len == 0
            || !h.len.is_multiple_of(BLOCK_BYTES)
            || u64::from(h.offset) + u64::from(h.len) > proto::CHUNK_SIZE
        {
            return Err(bad_request(
                "a repair covers whole 4 KiB blocks of one chunk",
            ));
        }
        let route = self.route(h, Role::Primary).await?;
        let Some((secondary, addr)) = route.secondary else {
            return Err(WireError::new(
                ErrorCode::WrongPg,
                "the PG has no secondary to repair",
            ));
        };
        let _order = self
            .order
            .lock(h.chunk, BlockMask::bytes(h.offset, h.len))
            .await;
        let data = self
            .storage
            .read(h.chunk, h.offset, h.len)
            .await
            .map_err(|e| self.store_error(e))?;
        let w = DataHeader {
            op: DataOp::ReplicaWrite,
            ..*h
        };
        self.replicas
            .forward(secondary, addr, &w, data)
            .await
            .map_err(|e| self.forward_error(e))
    }

    /// Repair this SDS's block at `offset` of `chunk` (it failed its checksum) from the PG's
    /// other copy, whatever this SDS's role: as the primary it fetches the secondary's block,
    /// as the secondary it asks the primary to rewrite it. `Ok(false)` when the chunk is in no
    /// PG this SDS holds (nobody reads it).
    pub async fn repair_block(
        &self,
        chunk: proto::ChunkId,
        offset: u32,
    ) -> Result<bool, WireError> {
        let map = self.map.state();
        let Some(pool) = map.volume_by_vtree(chunk.vtree).map(|v| v.pool) else {
            return Ok(false);
        };
        let Some(p) = map.pools.get(&pool) else {
            return Ok(false);
        };
        let pg = chunk.pg(p.pg_count);
        let Some(m) = p.pg(pg).copied() else {
            return Ok(false);
        };
        let me = self.map.me();
        if me.is_some() && m.primary == me {
            self.repair_local(pool, pg, chunk, offset).await?;
        } else if me.is_some() && m.secondary == me {
            self.request_repair(pool, pg, chunk, offset).await?;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// As the PG's secondary, ask the primary to rewrite this SDS's copy of a block.
    pub async fn request_repair(
        &self,
        pool: proto::PoolId,
        pg: proto::PgId,
        chunk: proto::ChunkId,
        offset: u32,
    ) -> Result<(), WireError> {
        let map = self.map.state();
        let p = map
            .pools
            .get(&pool)
            .ok_or_else(|| WireError::new(ErrorCode::WrongPg, "unknown pool"))?;
        let primary = p
            .pg(pg)
            .and_then(|m| m.primary)
            .ok_or_else(|| WireError::new(ErrorCode::WrongPg, "the PG has no primary"))?;
        let addr = map
            .sds
            .get(&primary)
            .and_then(|x| x.addr.parse().ok())
            .ok_or_else(|| WireError::new(ErrorCode::Unavailable, "the primary has no address"))?;
        let block = offset / BLOCK_BYTES * BLOCK_BYTES;
        let h = DataHeader::at(DataOp::Repair, pool, pg, p.epoch, chunk, block, BLOCK_BYTES);
        match self.replicas.call(primary, addr, &h).await {
            Ok(_) => {
                self.metrics.repaired_blocks.inc();
                tracing::warn!(%chunk, offset = block, from = %primary, "repaired a block that failed its checksum from the primary");
                Ok(())
            }
            Err(e) => {
                self.metrics.unrecoverable_blocks.inc();
                tracing::error!(%chunk, offset = block, "block failed its checksum and the primary could not repair it: {e}");
                Err(self.forward_error(e))
            }
        }
    }
}
