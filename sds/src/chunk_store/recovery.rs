//! Opening a store: format a blank device or check its superblock, find the journal's
//! checkpoint, scan and replay the records after it, and load every slot's meta page into the
//! allocation map (see "Crash consistency" in the module doc of [`super`]).

use super::*;

impl<D: BlockDevice> ChunkStore<D> {
    /// Open the store on `dev`: format a blank device (all zeros at the superblock), refuse a
    /// foreign or unsupported one, replay the journal and load the allocation map.
    pub async fn open(dev: D) -> Result<ChunkStore<D>, StoreError> {
        let capacity = dev.capacity();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let plan = Superblock::plan(capacity, rand::random::<u128>() | 1, now)
            .ok_or(StoreError::TooSmall { capacity })?;
        let page = dev.read(0, AlignedBuf::zeroed(PAGE)).await?;
        let blank = page.as_slice().iter().all(|b| *b == 0);
        let sb = if blank {
            plan
        } else {
            Superblock::decode(page.as_slice(), capacity)?
        };
        let mut store = ChunkStore {
            dev,
            sb,
            index: RwLock::new(BTreeMap::new()),
            slots: Mutex::new(Slots::new(sb.slot_count)),
            locks: RangeLocks::new(),
            next_generation: AtomicU64::new(1),
            formatted: blank,
            corrupt_pages: 0,
            replayed: 0,
            journal: Mutex::new(JState {
                epoch: 0,
                next_seq: 1,
                head: sb.journal_offset + 2 * PAGE as u64,
                records: VecDeque::new(),
                used: 0,
                done: BTreeSet::new(),
                contiguous: 0,
                durable: 0,
                ckpt_count: 0,
                ckpt_tail: 1,
                ckpt_durable: 1,
                ckpt_unflushed: None,
                ckpt_ready: None,
                failed: None,
            }),
            progress: tokio::sync::Notify::new(),
            dirty: Mutex::new(HashMap::new()),
            apply_bufs: BufferPool::new(&apply_pool_config()),
            apply_lock: tokio::sync::Mutex::new(()),
            barrier_lock: tokio::sync::Mutex::new(()),
            barriers_started: AtomicU64::new(0),
            barriers_done: AtomicU64::new(0),
            whole_writes: AtomicU64::new(0),
            applier: None,
        };
        if blank {
            // The checkpoint is durable before the superblock that points at it.
            let ck = Checkpoint {
                count: 0,
                epoch: rand::random::<u64>(),
                tail_seq: 1,
                tail_pos: store.ring().0,
            };
            store.write_checkpoint(ck).await?;
            store.dev.flush().await?;
            store.start_epoch(ck);
            let mut page = page;
            sb.encode(page.as_mut_slice());
            store.dev.write(0, page).await?;
            store.dev.flush().await?;
        } else {
            store.load().await?;
        }
        Ok(store)
    }

    /// The record area of the journal: `[start, end)` device offsets.
    pub(super) fn ring(&self) -> (u64, u64) {
        (
            self.sb.journal_offset + 2 * PAGE as u64,
            self.sb.journal_offset + self.sb.journal_len,
        )
    }

    pub(super) async fn write_checkpoint(&self, ck: Checkpoint) -> Result<(), StoreError> {
        let mut page = AlignedBuf::zeroed(PAGE);
        ck.encode(page.as_mut_slice(), self.sb.device_uuid);
        let at = self.sb.journal_offset + (ck.count % 2) * PAGE as u64;
        self.dev.write(at, page).await?;
        Ok(())
    }

    /// Reset the in-memory journal to an empty one starting at `ck` (durable).
    pub(super) fn start_epoch(&self, ck: Checkpoint) {
        let mut j = lock(&self.journal);
        j.epoch = ck.epoch;
        j.next_seq = ck.tail_seq;
        j.head = ck.tail_pos;
        j.records.clear();
        j.used = 0;
        j.done.clear();
        j.contiguous = ck.tail_seq - 1;
        j.durable = ck.tail_seq - 1;
        j.ckpt_count = ck.count;
        j.ckpt_tail = ck.tail_seq;
        j.ckpt_durable = ck.tail_seq;
        j.ckpt_unflushed = None;
        j.ckpt_ready = None;
        j.failed = None;
    }

    /// The valid checkpoint with the higher count.
    pub(super) async fn read_checkpoint(&self) -> Result<Checkpoint, StoreError> {
        let buf = AlignedBuf::zeroed(2 * PAGE);
        let buf = self.dev.read(self.sb.journal_offset, buf).await?;
        buf.as_slice()
            .chunks_exact(PAGE)
            .filter_map(|p| Checkpoint::decode(p, self.sb.device_uuid))
            .filter(|c| c.tail_seq > 0)
            .max_by_key(|c| c.count)
            .ok_or(StoreError::Superblock(SuperblockError::NoCheckpoint))
    }

    /// The records replay needs: from the checkpoint's tail, each intact (header and payload
    /// CRC), of the checkpoint's epoch and the next sequence number, until one is not.
    pub(super) async fn scan(
        &self,
        ck: Checkpoint,
    ) -> Result<Vec<(RecordHeader, Bytes)>, StoreError> {
        let (start, end) = self.ring();
        let mut out = Vec::new();
        let (mut pos, mut seq, mut scanned) = (ck.tail_pos, ck.tail_seq, 0u64);
        while scanned <= end - start {
            let mut found = None;
            for (i, at) in [pos, start].into_iter().enumerate() {
                if (i == 1 && pos == start) || at < start || at + PAGE as u64 > end {
                    continue;
                }
                let head = self.dev.read(at, AlignedBuf::zeroed(PAGE)).await?;
                match RecordHeader::decode(head.as_slice(), self.sb.device_uuid) {
                    Some(h)
                        if h.epoch == ck.epoch
                            && u64::from(h.slot.0) < self.sb.slot_count
                            && u64::from(h.from.0) < self.sb.slot_count
                            && h.seq == seq
                            && at + (PAGE + h.payload_len()) as u64 <= end =>
                    {
                        found = Some((at, h));
                        break;
                    }
                    _ => {}
                }
            }
            let Some((at, h)) = found else { break };
            let n = h.payload_len();
            let payload = if n > 0 {
                let buf = self
                    .dev
                    .read(at + PAGE as u64, AlignedBuf::zeroed(n))
                    .await?;
                if crc32fast::hash(buf.as_slice()) != h.payload_crc {
                    break;
                }
                Bytes::copy_from_slice(buf.as_slice())
            } else {
                Bytes::new()
            };
            out.push((h, payload));
            pos = at + (PAGE + n) as u64;
            seq += 1;
            scanned += (PAGE + n) as u64;
        }
        Ok(out)
    }

    /// Replay the journal, read every meta page and rebuild the index, the slot bitmap and the
    /// generation counter.
    pub(super) async fn load(&mut self) -> Result<(), StoreError> {
        let ck = self.read_checkpoint().await?;
        let records = self.scan(ck).await?;
        let touched: BTreeSet<SlotIndex> =
            records.iter().flat_map(|(h, _)| [h.slot, h.from]).collect();
        let mut pages: BTreeMap<SlotIndex, ChunkMeta> = BTreeMap::new();
        let mut max_generation = 0;
        let mut buf = AlignedBuf::zeroed((LOAD_BATCH_PAGES as usize) * PAGE);
        let mut first = 0u64;
        while first < self.sb.slot_count {
            let n = (self.sb.slot_count - first).min(LOAD_BATCH_PAGES);
            buf.set_window(0, n as usize * PAGE);
            buf = self
                .dev
                .read(self.sb.meta_offset + first * PAGE as u64, buf)
                .await?;
            for (i, page) in buf.as_slice().chunks_exact(PAGE).enumerate() {
                let slot = SlotIndex((first + i as u64) as u32);
                match ChunkMeta::decode(page, self.sb.device_uuid, slot) {
                    MetaPage::Free => {}
                    MetaPage::Corrupt if touched.contains(&slot) => {
                        // Torn by a crash during an apply that the replay below redoes.
                        if let Some(m) = ChunkMeta::decode_lenient(page, self.sb.device_uuid, slot)
                        {
                            pages.insert(slot, m);
                        }
                    }
                    MetaPage::Corrupt => self.corrupt_pages += 1,
                    MetaPage::Version(found) => {
                        return Err(StoreError::MetaVersion {
                            slot: slot.0,
                            found,
                        })
                    }
                    MetaPage::InUse(m) => {
                        max_generation = max_generation.max(m.generation);
                        pages.insert(slot, *m);
                    }
                }
            }
            first += n;
        }

        // Replay in sequence order: idempotent, so records already applied are harmless.
        let mut last = ck.tail_seq.saturating_sub(1);
        for (h, payload) in &records {
            last = h.seq;
            max_generation = max_generation.max(h.generation);
            let slot = h.slot;
            match h.kind {
                RecordKind::Write => {
                    let m = pages.entry(slot).or_insert_with(|| ChunkMeta::new(h.chunk));
                    if m.chunk != h.chunk {
                        *m = ChunkMeta::new(h.chunk);
                    }
                    for (i, block) in payload.chunks_exact(BLOCK).enumerate() {
                        m.set_written(h.first as usize + i, crc32fast::hash(block));
                    }
                    m.generation = m.generation.max(h.generation);
                    if !payload.is_empty() {
                        let mut buf = AlignedBuf::zeroed(payload.len());
                        buf.as_mut_slice().copy_from_slice(payload);
                        self.dev
                            .write(self.data_offset(slot, h.first as usize), buf)
                            .await?;
                    }
                }
                RecordKind::Trim => {
                    if let Some(m) = pages.get_mut(&slot).filter(|m| m.chunk == h.chunk) {
                        for b in h.first..h.first + h.count {
                            m.clear_written(b as usize);
                        }
                        m.generation = m.generation.max(h.generation);
                    }
                }
                RecordKind::Free => {
                    if pages.get(&slot).is_some_and(|m| m.chunk == h.chunk) {
                        pages.remove(&slot);
                    }
                }
                RecordKind::Relocate => {
                    if h.from != slot && pages.get(&h.from).is_some_and(|m| m.chunk == h.chunk) {
                        pages.remove(&h.from);
                    }
                    // The blocks were durable before the record was written; later records
                    // of the chunk in this replay rewrite whatever they changed since.
                    let data = self
                        .dev
                        .read(
                            self.data_offset(slot, 0),
                            AlignedBuf::zeroed(CHUNK_SIZE as usize),
                        )
                        .await?;
                    let mut m = ChunkMeta::new(h.chunk);
                    for (b, block) in data.as_slice().chunks_exact(BLOCK).enumerate() {
                        m.set_written(b, crc32fast::hash(block));
                    }
                    m.generation = h.generation;
                    pages.insert(slot, m);
                }
            }
        }
        for slot in &touched {
            let mut page = AlignedBuf::zeroed(PAGE);
            if let Some(m) = pages.get(slot) {
                m.encode(page.as_mut_slice(), self.sb.device_uuid, *slot);
            }
            self.dev.write(self.meta_offset(*slot), page).await?;
        }
        if !records.is_empty() {
            tracing::info!(
                records = records.len(),
                chunks = touched.len(),
                "replayed the journal"
            );
        }
        self.replayed = records.len() as u64;

        // Claims of one chunk by two slots: the later generation wins.
        let mut index: BTreeMap<ChunkId, (SlotIndex, ChunkMeta)> = BTreeMap::new();
        let mut slots = Slots::new(self.sb.slot_count);
        let mut stale = Vec::new();
        for (slot, m) in pages {
            let chunk = m.chunk;
            let older = match index.get(&chunk) {
                Some((_, om)) if om.generation >= m.generation => Some(slot),
                Some((other, _)) => Some(*other),
                None => None,
            };
            if older != Some(slot) {
                slots.mark(u64::from(slot.0));
                index.insert(chunk, (slot, m));
            }
            stale.extend(older);
        }
        for slot in &stale {
            // The older claim of a chunk: free it on the device so it never wins later.
            slots.release(u64::from(slot.0));
            let page = AlignedBuf::zeroed(PAGE);
            self.dev.write(self.meta_offset(*slot), page).await?;
        }
        if !stale.is_empty() {
            tracing::warn!(
                count = stale.len(),
                "freed stale duplicate chunk claims at load"
            );
        }
        if self.corrupt_pages > 0 {
            tracing::warn!(
                count = self.corrupt_pages,
                "meta pages failed their checksum at load; their chunks are lost on this copy"
            );
        }
        // Everything replayed is in place and durable before the checkpoint moves past it; a
        // new epoch starts an empty journal.
        self.dev.flush().await?;
        let next = Checkpoint {
            count: ck.count + 1,
            epoch: rand::random::<u64>(),
            tail_seq: last + 1,
            tail_pos: self.ring().0,
        };
        self.write_checkpoint(next).await?;
        self.dev.flush().await?;
        self.start_epoch(next);

        let index = index
            .into_iter()
            .map(|(chunk, (slot, m))| {
                let e = Entry {
                    slot,
                    state: Mutex::new(ChunkState {
                        generation: m.generation,
                        disk: m,
                        pending: BTreeMap::new(),
                        free_seq: None,
                        alloc_seq: None,
                        moved: false,
                    }),
                };
                (chunk, Arc::new(e))
            })
            .collect();
        self.index = RwLock::new(index);
        self.slots = Mutex::new(slots);
        self.next_generation = AtomicU64::new(max_generation + 1);
        Ok(())
    }
}
