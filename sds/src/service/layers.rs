//! A V-tree member's I/O through the layers below its own (see `proto::model::Vtree`).
//!
//! A client's request names the chunk in the layer its volume writes to. Every layer of a tree
//! keeps chunk `i` in the same PG, so the primary resolves everything locally:
//! - **Reads** take each 4 KiB block from the first layer of the chain (the volume's, then each
//!   parent) whose chunk has it written; a block no layer wrote reads as zeros.
//! - **Writes** go to the volume's layer only (redirect-on-write at the block): a partial block
//!   the layer has not written yet is completed from the layers below first, so the chunk store
//!   never fills its rest with zeros. **Trims** and write-zeroes of blocks a lower layer holds
//!   become writes of zeros (the lower layer's data must stay hidden).
//!
//! The primary does this under the blocks' write-order lock and forwards the resulting plain,
//! block-aligned write: the secondary (or a rebuild target, which may not hold the lower layers
//! yet) applies exactly what the primary applied. Lower layers are frozen (nothing writes them
//! once a snapshot froze them), so reading them needs no lock.

use super::Service;
use crate::device::BlockDevice;
use bytes::{Bytes, BytesMut};
use proto::data::{DataHeader, DataOp};
use proto::{ChunkId, LayerId, WireError, BLOCK_SIZE};

const BLOCK: u32 = BLOCK_SIZE as u32;

/// A chunk's written-block bitmap (256 blocks of 4 KiB).
type Written = [u64; 4];

fn is_set(w: &Written, block: u32) -> bool {
    w.get((block / 64) as usize)
        .is_some_and(|x| x & (1u64 << (block % 64)) != 0)
}

/// For each block `first .. end`, the index in `written` (a chain, top layer first) of the
/// first layer that wrote it, or `None` (zeros).
fn sources(written: &[Option<Written>], first: u32, end: u32) -> Vec<Option<usize>> {
    (first..end)
        .map(|b| {
            written
                .iter()
                .position(|w| w.as_ref().is_some_and(|w| is_set(w, b)))
        })
        .collect()
}

/// Runs of consecutive blocks with the same source: `(first block, blocks, source)`.
fn runs(first: u32, sources: &[Option<usize>]) -> Vec<(u32, u32, Option<usize>)> {
    let mut out: Vec<(u32, u32, Option<usize>)> = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        match out.last_mut() {
            Some(last) if last.2 == *s => last.1 += 1,
            _ => out.push((first + i as u32, 1, *s)),
        }
    }
    out
}

impl<D: BlockDevice> Service<D> {
    /// The chain of layers a client's request on `chunk` looks through, its own first, when it
    /// has layers below; `None` for a layer with none (a volume never snapshotted, the common
    /// case, answered without building a chain).
    fn chain(&self, chunk: ChunkId) -> Option<Vec<LayerId>> {
        let map = self.map.state();
        let below = map
            .vtrees
            .get(&chunk.vtree)
            .and_then(|t| t.layers.get(&chunk.layer))
            .is_some_and(Option::is_some);
        if !below {
            return None;
        }
        let chain = map.chain(chunk.vtree, chunk.layer);
        (chain.len() >= 2).then_some(chain)
    }

    /// The written blocks of `chunk` in each layer of `chain`.
    fn written_in(&self, chunk: ChunkId, chain: &[LayerId]) -> Vec<Option<Written>> {
        chain
            .iter()
            .map(|l| self.storage.written(chunk.in_layer(*l)))
            .collect()
    }

    /// A client read: from the volume's own layer, and through the layers below for blocks
    /// it has not written.
    pub(super) async fn read_through_layers(&self, h: &DataHeader) -> Result<Bytes, WireError> {
        let Some(chain) = self.chain(h.chunk) else {
            return self.read_repairing(h).await;
        };
        let written = self.written_in(h.chunk, &chain);
        if written[1..].iter().all(Option::is_none) {
            return self.read_repairing(h).await;
        }
        let (start, end) = (h.offset, h.offset + h.len);
        let first = start / BLOCK;
        let last = end.div_ceil(BLOCK);
        let mut out = BytesMut::zeroed(h.len as usize);
        for (b, n, src) in runs(first, &sources(&written, first, last)) {
            let from = (b * BLOCK).max(start);
            let to = ((b + n) * BLOCK).min(end);
            let Some(src) = src else {
                continue; // zeros
            };
            let part = DataHeader {
                chunk: h.chunk.in_layer(chain[src]),
                offset: from,
                len: to - from,
                ..*h
            };
            let data = self.read_repairing(&part).await?;
            let at = (from - start) as usize;
            out[at..at + data.len()].copy_from_slice(&data);
        }
        Ok(out.freeze())
    }

    /// Which chunks of a client's AllocStatus are allocated in any layer its volume reads.
    pub(super) fn allocated_through_layers(&self, h: &DataHeader) -> Vec<u8> {
        let mut out = vec![0u8; h.len as usize];
        let chain = self.chain(h.chunk).unwrap_or_else(|| vec![h.chunk.layer]);
        for layer in chain {
            for (o, a) in out
                .iter_mut()
                .zip(self.storage.allocated(h.chunk.in_layer(layer), h.len))
            {
                *o |= a;
            }
        }
        out
    }

    /// Turn a client's write, trim or write-zeroes on a layer with layers below into the plain
    /// write (or trim) of that layer that gives the same result (see the module doc). Called
    /// by the primary under the blocks' write-order lock, which covers every block touched.
    pub(super) async fn resolve_layers(
        &self,
        h: DataHeader,
        data: Bytes,
    ) -> Result<(DataHeader, Bytes), WireError> {
        let Some(chain) = self.chain(h.chunk).filter(|_| h.len > 0) else {
            return Ok((h, data));
        };
        let written = self.written_in(h.chunk, &chain);
        if written[1..].iter().all(Option::is_none) {
            return Ok((h, data));
        }
        let (start, end) = (h.offset, h.offset + h.len);
        let (first, last) = (start / BLOCK, end.div_ceil(BLOCK));
        let own = written[0];
        let below = &written[1..];
        let below_has = |b: u32| {
            below
                .iter()
                .any(|w| w.as_ref().is_some_and(|w| is_set(w, b)))
        };
        let own_has = |b: u32| own.as_ref().is_some_and(|w| is_set(w, b));
        let zeroing = matches!(h.op, DataOp::Trim | DataOp::WriteZeroes);
        if zeroing && !(first..last).any(below_has) {
            return Ok((h, data)); // nothing below to hide: a plain trim of this layer
        }
        // A partial edge block this layer has not written but a lower one has: take the rest of
        // the block from below (a block this layer wrote is completed by the chunk store).
        let head_edge = start % BLOCK != 0 && !own_has(first) && below_has(first);
        let tail_edge = end % BLOCK != 0 && !own_has(last - 1) && below_has(last - 1);
        if !zeroing && !head_edge && !tail_edge {
            return Ok((h, data));
        }
        let new_start = if head_edge { first * BLOCK } else { start };
        let new_end = if tail_edge { last * BLOCK } else { end };
        let mut buf = BytesMut::zeroed((new_end - new_start) as usize);
        for (edge, block) in [(head_edge, first), (tail_edge, last - 1)] {
            if !edge {
                continue;
            }
            let Some(src) = sources(below, block, block + 1)[0] else {
                continue;
            };
            let part = DataHeader {
                op: DataOp::Read,
                chunk: h.chunk.in_layer(chain[src + 1]),
                offset: block * BLOCK,
                len: BLOCK,
                ..h
            };
            let old = self.read_repairing(&part).await?;
            let at = (block * BLOCK - new_start) as usize;
            buf[at..at + old.len()].copy_from_slice(&old);
        }
        let at = (start - new_start) as usize;
        if zeroing {
            buf[at..at + h.len as usize].fill(0);
        } else {
            buf[at..at + data.len()].copy_from_slice(&data);
        }
        let resolved = DataHeader {
            op: DataOp::Write,
            offset: new_start,
            len: new_end - new_start,
            ..h
        };
        Ok((resolved, buf.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(blocks: &[u32]) -> Written {
        let mut w = [0u64; 4];
        for b in blocks {
            w[(*b / 64) as usize] |= 1 << (b % 64);
        }
        w
    }

    #[test]
    fn each_block_comes_from_the_first_layer_that_wrote_it() {
        let chain = [Some(bits(&[1, 2])), None, Some(bits(&[0, 2, 3]))];
        assert_eq!(
            sources(&chain, 0, 5),
            vec![Some(2), Some(0), Some(0), Some(2), None]
        );
        assert_eq!(
            runs(0, &sources(&chain, 0, 5)),
            vec![
                (0, 1, Some(2)),
                (1, 2, Some(0)),
                (3, 1, Some(2)),
                (4, 1, None)
            ]
        );
        assert_eq!(runs(7, &[]), vec![]);
        assert!(is_set(&bits(&[255]), 255) && !is_set(&bits(&[255]), 254));
    }
}
