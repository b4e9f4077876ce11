//! Flushes and the apply of the journal: a flush makes completed writes durable; records a
//! flush made durable are written in place by the next apply round (or when the journal is
//! half full), which then frees their journal space.

use super::*;

impl<D: BlockDevice> ChunkStore<D> {
    /// Make every completed write durable: wait for the journal records issued before the
    /// call, write in place the records an earlier flush made durable, and flush the device
    /// (one device flush: it covers both). The records this flush made durable are applied by
    /// the next one (or when the journal is half full).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let target = {
            let j = lock(&self.journal);
            if j.failed.is_some() {
                return Err(failed());
            }
            j.next_seq - 1
        };
        self.wait_done(target).await;
        if lock(&self.journal).failed.is_some_and(|f| f <= target) {
            return Err(failed());
        }
        self.apply_round(false, false).await
    }

    /// Flush, apply every journaled change in place and make that and the checkpoint durable:
    /// afterwards the overlay is empty and the journal space free (for tests, and before a
    /// planned shutdown).
    pub async fn apply_journal(&self) -> Result<(), StoreError> {
        self.apply_round(true, true).await
    }

    /// The device's flush; a checkpoint written before it becomes durable, so the journal
    /// space before its tail is reclaimed.
    pub(super) async fn dev_flush(&self) -> Result<(), StoreError> {
        let (ck, contiguous) = {
            let j = lock(&self.journal);
            (j.ckpt_unflushed, j.contiguous)
        };
        self.dev.flush().await?;
        {
            let mut j = lock(&self.journal);
            j.durable = j.durable.max(contiguous);
            if let Some(tail) = ck {
                j.reclaim(tail);
                j.ckpt_durable = j.ckpt_durable.max(tail);
                if j.ckpt_unflushed == Some(tail) {
                    j.ckpt_unflushed = None;
                }
            }
        }
        self.progress.notify_waiters();
        Ok(())
    }

    /// Apply every durable journaled change in place, flush the device, then move the
    /// checkpoint past them. With `fresh`, flush first so that every completed record is
    /// durable and applied; with `final_flush`, flush the checkpoint too, so the journal space
    /// is reclaimed now.
    pub(super) async fn apply_round(
        &self,
        fresh: bool,
        final_flush: bool,
    ) -> Result<(), StoreError> {
        let _one = self.apply_lock.lock().await;
        self.apply_locked(fresh, final_flush).await
    }

    /// A fresh apply round (with `final_flush`, its checkpoint made durable too) unless one is
    /// running already, which then covers the caller's records or leaves them to the next
    /// round. A failure is logged: the caller's own write already succeeded.
    pub(super) async fn try_apply_round(&self, final_flush: bool) {
        if let Ok(_one) = self.apply_lock.try_lock() {
            if let Err(e) = self.apply_locked(true, final_flush).await {
                tracing::warn!("applying the journal failed: {e}");
            }
        }
    }

    /// An apply round is due: signal the background applier, or (without one) run it here.
    pub(super) async fn want_apply(&self, final_flush: bool) {
        match &self.applier {
            Some(n) => n.notify_one(),
            None => self.try_apply_round(final_flush).await,
        }
    }

    /// Hand the applies that writes call for to a background task: `wanted` is signalled
    /// and the task is expected to call [`apply_journal`](Self::apply_journal). A write then
    /// never waits for a round it did not need (one write in thousands used to wait for a
    /// whole round: 25-200 ms at 4 KiB QD32). The journal-full and no-free-slot cases still
    /// apply in the writer: it cannot go on without the space.
    pub fn apply_in_background(mut self, wanted: Arc<tokio::sync::Notify>) -> Self {
        self.applier = Some(wanted);
        self
    }

    /// The body of [`apply_round`](Self::apply_round); the caller holds `apply_lock`.
    pub(super) async fn apply_locked(
        &self,
        fresh: bool,
        final_flush: bool,
    ) -> Result<(), StoreError> {
        let stale = {
            let j = lock(&self.journal);
            j.durable < j.contiguous
        };
        if fresh && stale {
            self.dev_flush().await?;
        }
        // Only durable records are applied in place: a power loss drops or tears any write
        // not covered by a completed flush, and replay must be able to redo what was started.
        let c = {
            let j = lock(&self.journal);
            // Replay stops at a failed record: nothing after it may be applied in place.
            j.failed.map_or(j.durable, |f| j.durable.min(f - 1))
        };

        let entries: Vec<Arc<Entry>> = lock(&self.dirty).values().cloned().collect();
        let mut plans = Vec::new();
        for entry in entries {
            let st = lock(&entry.state);
            let blocks: Vec<(usize, u64)> = st
                .pending
                .iter()
                .filter(|(_, p)| p.seq <= c)
                .map(|(b, p)| (*b, p.seq))
                .collect();
            if st.free_seq.is_some_and(|s| s <= c) {
                let discard = !st.moved;
                drop(st);
                plans.push(Plan {
                    entry,
                    blocks,
                    page: None,
                    discard,
                    runs: Vec::new(),
                });
                continue;
            }
            let allocated = st.alloc_seq.is_some_and(|s| s <= c);
            if blocks.is_empty() && !allocated {
                continue;
            }
            let mut page = st.disk.clone();
            let mut runs: Vec<(usize, Vec<Bytes>)> = Vec::new();
            for (b, _) in &blocks {
                let Some(p) = st.pending.get(b) else { continue };
                match &p.data {
                    Some(d) => {
                        page.set_written(*b, p.crc);
                        match runs.last_mut() {
                            Some((f, v)) if *f + v.len() == *b => v.push(d.clone()),
                            _ => runs.push((*b, vec![d.clone()])),
                        }
                    }
                    None => page.clear_written(*b),
                }
            }
            page.generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            drop(st);
            plans.push(Plan {
                entry,
                blocks,
                page: Some(page),
                discard: false,
                runs,
            });
        }

        type Io<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;
        let mut ios: Vec<Io<'_>> = Vec::new();
        for plan in &plans {
            let slot = plan.entry.slot;
            for (first, run) in &plan.runs {
                let at = self.data_offset(slot, *first);
                ios.push(Box::pin(async move {
                    // At most the apply pool's worth of runs are in flight; the others wait
                    // for a buffer (only this round's writes hold them).
                    let mut buf = self.apply_bufs.get(run.len() * BLOCK).await;
                    for (i, d) in run.iter().enumerate() {
                        buf.as_mut_slice()[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(d);
                    }
                    self.dev.write(at, buf).await?;
                    Ok(())
                }));
            }
        }
        crate::failpoints::fail_point(crate::failpoints::CHUNK_STORE_BEFORE_META_WRITE);
        for plan in &plans {
            let slot = plan.entry.slot;
            let mut page = AlignedBuf::zeroed(PAGE);
            if let Some(m) = &plan.page {
                m.encode(page.as_mut_slice(), self.sb.device_uuid, slot);
            }
            let at = self.meta_offset(slot);
            let discard = plan.discard;
            ios.push(Box::pin(async move {
                self.dev.write(at, page).await?;
                if discard {
                    let data = self.data_offset(slot, 0);
                    if let Err(e) = self.dev.discard(data, CHUNK_SIZE).await {
                        tracing::debug!(slot = slot.0, "discard of a freed chunk failed: {e}");
                    }
                }
                Ok(())
            }));
        }
        // The previous round's checkpoint: its in-place writes were durable when it was
        // computed, and the checkpoint before it is durable too (the previous round's flush).
        let ready = lock(&self.journal).ckpt_ready.take();
        if let Some(ck) = ready {
            ios.push(Box::pin(self.write_checkpoint(ck)));
        }
        let applied = plans.len();
        let mut first_err = None;
        while !ios.is_empty() {
            let rest = ios.split_off(ios.len().min(APPLY_PARALLEL));
            let batch = std::mem::replace(&mut ios, rest);
            for r in join_all(batch).await {
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
            if first_err.is_some() {
                break;
            }
        }
        if let Some(e) = first_err {
            // The overlay stays; the checkpoint is written by a later round.
            if let Some(ck) = ready {
                lock(&self.journal).ckpt_ready.get_or_insert(ck);
            }
            return Err(e);
        }
        if let Some(ck) = ready {
            let mut j = lock(&self.journal);
            j.ckpt_count = ck.count;
            j.ckpt_unflushed = Some(ck.tail_seq);
        }
        // Makes the in-place writes durable, the last checkpoint (before the next one
        // overwrites its twin), and every record completed so far (a client's flush).
        self.dev_flush().await?;

        for plan in &plans {
            let mut st = lock(&plan.entry.state);
            for (b, seq) in &plan.blocks {
                match st.pending.get(b).map(|p| p.seq == *seq) {
                    Some(true) => {
                        st.pending.remove(b);
                    }
                    Some(false) => {
                        if let Some(p) = st.pending.get_mut(b) {
                            p.oldest = seq + 1;
                        }
                    }
                    None => {}
                }
            }
            match &plan.page {
                Some(m) => {
                    st.disk = m.clone();
                    if st.alloc_seq.is_some_and(|s| s <= c) {
                        st.alloc_seq = None;
                    }
                }
                None => {
                    let seq = st.free_seq.take().unwrap_or(c);
                    // An allocation not applied yet is void too: the slot stays free.
                    st.alloc_seq = None;
                    st.pending.clear();
                    drop(st);
                    lock(&self.slots).unhold(u64::from(plan.entry.slot.0), seq);
                }
            }
        }
        let tail = {
            let mut dirty = lock(&self.dirty);
            dirty.retain(|_, e| {
                let st = lock(&e.state);
                !st.pending.is_empty() || st.free_seq.is_some() || st.alloc_seq.is_some()
            });
            let mut tail = c + 1;
            for e in dirty.values() {
                let st = lock(&e.state);
                for p in st.pending.values() {
                    tail = tail.min(p.oldest);
                }
                if let Some(f) = st.free_seq {
                    tail = tail.min(f);
                }
                if let Some(a) = st.alloc_seq {
                    tail = tail.min(a);
                }
            }
            tail
        };
        let ck = {
            let j = lock(&self.journal);
            let tail = tail.max(j.ckpt_tail);
            let pos = if tail >= j.next_seq {
                Some(j.head)
            } else {
                j.records.iter().find(|r| r.seq == tail).map(|r| r.pos)
            };
            match pos {
                Some(pos) if tail > j.ckpt_tail => Some(Checkpoint {
                    count: j.ckpt_count + 1,
                    epoch: j.epoch,
                    tail_seq: tail,
                    tail_pos: pos,
                }),
                Some(_) => None,
                None => {
                    tracing::error!(tail, "journal tail record not found; checkpoint kept");
                    None
                }
            }
        };
        match ck {
            Some(ck) if final_flush => {
                self.write_checkpoint(ck).await?;
                {
                    let mut j = lock(&self.journal);
                    j.ckpt_count = ck.count;
                    j.ckpt_tail = ck.tail_seq;
                    j.ckpt_unflushed = Some(ck.tail_seq);
                }
                self.dev_flush().await?;
            }
            Some(ck) => {
                let mut j = lock(&self.journal);
                j.ckpt_tail = ck.tail_seq;
                j.ckpt_ready = Some(ck);
            }
            None => {}
        }
        if applied > 0 {
            tracing::debug!(chunks = applied, upto = c, "applied the journal");
        }
        Ok(())
    }
}
