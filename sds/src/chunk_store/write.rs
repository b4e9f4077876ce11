//! The write path: journaled block writes (records appended to the circular journal, the
//! blocks kept in the in-memory overlay until applied), whole-chunk writes out of place, FUA
//! writes, pre-allocation of thick chunks, and waiting for records to complete in order.

use super::*;

impl<D: BlockDevice> ChunkStore<D> {
    /// Write `data` at `offset` of `chunk`, allocating the chunk on first write. Returns when
    /// the journal record is on the device (durable after the next [`flush`](Self::flush)).
    pub async fn write(&self, chunk: ChunkId, offset: u32, data: &[u8]) -> Result<(), StoreError> {
        check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let (b0, b1) = blocks(offset, data.len());
        let _range = self.locks.lock(chunk, BlockMask::range(b0, b1)).await;
        if offset == 0
            && data.len() as u64 == CHUNK_SIZE
            && self.sb.version >= 3
            && self.write_whole(chunk, data).await?
        {
            return Ok(());
        }
        let entry = self.entry_or_allocate_applying(chunk).await?;
        let (start, end) = (offset as usize, offset as usize + data.len());
        let per_record = journal::record_blocks(self.sb.journal_len);
        let mut at = start;
        while at < end {
            let piece_end = end.min((at / BLOCK + per_record) * BLOCK);
            let piece = Fill::Data(&data[at - start..piece_end - start]);
            self.write_blocks(chunk, &entry, at as u32, piece).await?;
            at = piece_end;
        }
        Ok(())
    }

    /// Write a whole chunk out of place (the caller holds the whole-chunk lock): the blocks go
    /// to a slot no replayable record touches for an earlier chunk (the chunk's own slot if it
    /// holds no data yet), a device flush makes them durable, then a `Relocate` record moves
    /// the chunk there and frees its old slot. Half the device bytes of a journaled write (no
    /// copy in the journal, no apply) and no copy in memory. False, having changed nothing,
    /// when no such slot is free: the caller journals the write instead.
    pub(super) async fn write_whole(
        &self,
        chunk: ChunkId,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        if lock(&self.journal).failed.is_some() {
            return Err(failed());
        }
        let old = self.entry_or_allocate_applying(chunk).await?;
        let tail = lock(&self.journal).ckpt_durable;
        let empty = {
            let st = lock(&old.state);
            st.pending.is_empty() && st.free_seq.is_none() && !st.disk.any_written()
        };
        let taken = {
            let mut slots = lock(&self.slots);
            if empty && slots.clean(u64::from(old.slot.0), tail) {
                None
            } else {
                match slots.take(tail, true) {
                    Some(s) => Some(SlotIndex(s as u32)),
                    None => return Ok(false),
                }
            }
        };
        let slot = taken.unwrap_or(old.slot);
        let r = self.write_whole_to(chunk, &old, slot, data).await;
        if r.is_err() {
            if let Some(s) = taken {
                lock(&self.slots).release(u64::from(s.0));
            }
        }
        r.map(|()| true)
    }

    pub(super) async fn write_whole_to(
        &self,
        chunk: ChunkId,
        old: &Arc<Entry>,
        slot: SlotIndex,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let mut meta = ChunkMeta::new(chunk);
        for (b, block) in data.chunks_exact(BLOCK).enumerate() {
            meta.set_written(b, crc32fast::hash(block));
        }
        let mut buf = self.dev.buffers().get(data.len()).await;
        buf.as_mut_slice().copy_from_slice(data);
        self.dev.write(self.data_offset(slot, 0), buf).await?;
        self.barrier().await?;
        crate::failpoints::fail_point(crate::failpoints::CHUNK_STORE_BEFORE_RELOCATE_RECORD);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        meta.generation = generation;
        let header = RecordHeader {
            epoch: 0,
            seq: 0,
            kind: RecordKind::Relocate,
            chunk,
            slot,
            from: old.slot,
            first: 0,
            count: BLOCKS as u32,
            generation,
            payload_crc: crc32fast::hash(&[]),
        };
        let entry = Arc::new(Entry {
            slot,
            state: Mutex::new(ChunkState {
                disk: meta,
                pending: BTreeMap::new(),
                generation,
                free_seq: None,
                alloc_seq: None,
                moved: false,
            }),
        });
        let page = self.dev.buffers().page().await;
        let mark = Mark::Whole {
            replaces: old.clone(),
            retire: slot != old.slot,
        };
        self.append(header, page, &entry, Vec::new(), mark).await?;
        self.whole_writes.fetch_add(1, Ordering::Relaxed);
        if lock(&self.slots).held >= HELD_BEFORE_APPLY {
            self.want_apply(true).await;
        }
        Ok(())
    }

    /// Make every device write completed before the call durable: one device flush at a
    /// time, and a caller is covered by any flush that started after it called, so
    /// concurrent out-of-place writes share flushes.
    pub(super) async fn barrier(&self) -> Result<(), StoreError> {
        let ticket = self.barriers_started.load(Ordering::SeqCst);
        let _one = self.barrier_lock.lock().await;
        if self.barriers_done.load(Ordering::SeqCst) > ticket {
            return Ok(());
        }
        let n = self.barriers_started.fetch_add(1, Ordering::SeqCst) + 1;
        self.dev.flush().await?;
        self.barriers_done.store(n, Ordering::SeqCst);
        Ok(())
    }

    /// Whole-chunk writes written out of place since the store was opened.
    pub fn out_of_place_writes(&self) -> u64 {
        self.whole_writes.load(Ordering::Relaxed)
    }

    /// A write with forced unit access: durable when it returns.
    pub async fn write_fua(
        &self,
        chunk: ChunkId,
        offset: u32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.write(chunk, offset, data).await?;
        self.flush().await
    }

    /// Allocate `chunk` without writing data (thick volumes): it then holds a slot, survives
    /// restarts, and reads as zeros. A chunk already held is left alone. Returns whether it
    /// allocated. Journaled as a `Write` record of no blocks; its meta page is written in
    /// place by the next apply.
    pub async fn preallocate(&self, chunk: ChunkId) -> Result<bool, StoreError> {
        if self.recorded(chunk) {
            return Ok(false);
        }
        let _whole = self.locks.lock(chunk, BlockMask::all()).await;
        if self.recorded(chunk) {
            return Ok(false);
        }
        let entry = self.entry_or_allocate_applying(chunk).await?;
        let (header, page) = self
            .empty_record(RecordKind::Write, chunk, entry.slot, 0, 0)
            .await;
        self.append(header, page, &entry, Vec::new(), Mark::Alloc)
            .await?;
        Ok(true)
    }

    /// Journal the blocks under `[offset, offset + fill.len())` (at most
    /// [`journal::record_blocks`]): merge partial edge blocks with their old contents, write one
    /// record (header and full blocks), then put the blocks in the overlay. The caller holds
    /// the range lock.
    pub(super) async fn write_blocks(
        &self,
        chunk: ChunkId,
        entry: &Arc<Entry>,
        offset: u32,
        fill: Fill<'_>,
    ) -> Result<(), StoreError> {
        let len = fill.len();
        let (b0, b1) = blocks(offset, len);
        let n = b1 - b0;
        let head = offset as usize - b0 * BLOCK;
        let end = head + len;
        let mut buf = self.dev.buffers().get((n + 1) * BLOCK).await;
        if !head.is_multiple_of(BLOCK) {
            buf = self.load_block(chunk, entry, b0, buf, 1).await?;
        }
        if !end.is_multiple_of(BLOCK) && (n > 1 || head == 0) {
            buf = self.load_block(chunk, entry, b1 - 1, buf, n).await?;
        }
        buf.set_window(0, (n + 1) * BLOCK);
        {
            let dst = &mut buf.as_mut_slice()[BLOCK + head..BLOCK + end];
            match fill {
                Fill::Data(d) => dst.copy_from_slice(d),
                Fill::Zeros(_) => dst.fill(0),
            }
        }
        let payload = Bytes::copy_from_slice(&buf.as_slice()[BLOCK..]);
        let changes = (0..n)
            .map(|i| {
                let block = payload.slice(i * BLOCK..(i + 1) * BLOCK);
                let crc = crc32fast::hash(&block);
                (b0 + i, Some((block, crc)))
            })
            .collect();
        let header = RecordHeader {
            epoch: 0,
            seq: 0,
            kind: RecordKind::Write,
            chunk,
            slot: entry.slot,
            from: entry.slot,
            first: b0 as u32,
            count: n as u32,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            payload_crc: crc32fast::hash(&payload),
        };
        self.append(header, buf, entry, changes, Mark::Blocks).await
    }

    /// Put the old contents of `block` (from the overlay, or from the device verified) or
    /// zeros into block `at` of `buf`.
    pub(super) async fn load_block(
        &self,
        chunk: ChunkId,
        entry: &Entry,
        block: usize,
        mut buf: AlignedBuf,
        at: usize,
    ) -> Result<AlignedBuf, StoreError> {
        buf.set_window(at * BLOCK, BLOCK);
        let src = {
            let st = lock(&entry.state);
            match st.pending.get(&block) {
                Some(Pend { data: Some(d), .. }) => Src::Mem(d.clone()),
                Some(Pend { data: None, .. }) => Src::Zero,
                None if st.disk.is_written(block) => Src::Dev(st.disk.crcs[block]),
                None => Src::Zero,
            }
        };
        match src {
            Src::Zero => {
                buf.as_mut_slice().fill(0);
                Ok(buf)
            }
            Src::Mem(d) => {
                buf.as_mut_slice().copy_from_slice(&d);
                Ok(buf)
            }
            Src::Dev(crc) => {
                let buf = self
                    .dev
                    .read(self.data_offset(entry.slot, block), buf)
                    .await?;
                if crc32fast::hash(buf.as_slice()) != crc {
                    return Err(StoreError::ChecksumMismatch {
                        chunk,
                        offset: (block * BLOCK) as u32,
                    });
                }
                Ok(buf)
            }
        }
    }

    /// Take journal space for a record of `len` bytes, applying (and so reclaiming) when the
    /// journal is full. Returns the sequence number, device offset and epoch.
    pub(super) async fn reserve_journal(&self, len: u64) -> Result<(u64, u64, u64), StoreError> {
        let (start, end) = self.ring();
        loop {
            {
                let mut j = lock(&self.journal);
                if j.failed.is_some() {
                    return Err(failed());
                }
                if let Some(pos) = j.place(len, start, end) {
                    let seq = j.next_seq;
                    j.next_seq += 1;
                    j.head = pos + len;
                    j.used += len;
                    j.records.push_back(Rec { seq, pos, len });
                    return Ok((seq, pos, j.epoch));
                }
            }
            tracing::debug!("journal full; applying");
            self.apply_round(true, true).await?;
            tokio::task::yield_now().await;
        }
    }

    /// Write a record (`buf`: the header block then the payload) and, once it is on the
    /// device, put `changes` in the chunk's overlay (`free`: the record frees the chunk).
    pub(super) async fn append(
        &self,
        mut header: RecordHeader,
        mut buf: AlignedBuf,
        entry: &Arc<Entry>,
        changes: Vec<(usize, Option<(Bytes, u32)>)>,
        mark: Mark,
    ) -> Result<(), StoreError> {
        let (seq, pos, epoch) = self.reserve_journal(buf.len() as u64).await?;
        header.seq = seq;
        header.epoch = epoch;
        header.encode(&mut buf.as_mut_slice()[..PAGE], self.sb.device_uuid);
        if let Err(e) = self.dev.write_log(pos, buf).await {
            tracing::error!(
                seq,
                "journal write failed; the store accepts no more writes: {e}"
            );
            {
                let mut j = lock(&self.journal);
                j.failed = Some(j.failed.map_or(seq, |f| f.min(seq)));
            }
            self.mark_done(seq);
            return Err(e.into());
        }
        {
            let mut st = lock(&entry.state);
            for (b, change) in changes {
                let (data, crc) = match change {
                    Some((d, crc)) => (Some(d), crc),
                    None => (None, 0),
                };
                match st.pending.get_mut(&b) {
                    Some(p) => {
                        p.seq = seq;
                        p.data = data;
                        p.crc = crc;
                    }
                    None => {
                        st.pending.insert(
                            b,
                            Pend {
                                seq,
                                oldest: seq,
                                data,
                                crc,
                            },
                        );
                    }
                }
            }
            match &mark {
                Mark::Blocks => {}
                Mark::Free => st.free_seq = Some(seq),
                Mark::Alloc | Mark::Whole { .. } => st.alloc_seq = Some(seq),
            }
            st.generation = header.generation;
        }
        if let Mark::Whole { replaces, retire } = mark {
            if retire {
                {
                    let mut old = lock(&replaces.state);
                    old.free_seq = Some(seq);
                    old.moved = true;
                }
                lock(&self.slots).hold();
                lock(&self.dirty).insert(replaces.slot, replaces.clone());
            }
            // The chunk's lookups all happen under its range locks, which the caller holds
            // whole; an entry of the same slot also replaces the old one among the dirty.
            self.index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(header.chunk, entry.clone());
        }
        lock(&self.dirty).insert(entry.slot, entry.clone());
        if self.mark_done(seq) {
            self.want_apply(false).await;
        }
        Ok(())
    }

    /// Record `seq` as complete; true if the journal is more than half full.
    pub(super) fn mark_done(&self, seq: u64) -> bool {
        let (start, end) = self.ring();
        let half = {
            let mut j = lock(&self.journal);
            j.done.insert(seq);
            loop {
                let next = j.contiguous + 1;
                if !j.done.remove(&next) {
                    break;
                }
                j.contiguous = next;
            }
            j.used * 2 > end - start
        };
        self.progress.notify_waiters();
        half
    }

    /// Wait until every record up to `target` completed.
    pub(super) async fn wait_done(&self, target: u64) {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.journal).contiguous >= target {
                return;
            }
            notified.await;
        }
    }
}
