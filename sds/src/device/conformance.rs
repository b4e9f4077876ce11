//! The `BlockDevice` conformance suite: one set of checks every implementation passes, plus the
//! fault-injection checks of `FaultyDevice`.

use super::*;
use crate::test_util::Scratch;
use std::time::Duration;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn filled<D: BlockDevice>(d: &D, seed: u8, len: usize) -> AlignedBuf {
    let mut b = d.buffers().get(len).await;
    b.as_mut_slice().copy_from_slice(&pattern(seed, len));
    b
}

/// The contract of every `BlockDevice`.
async fn conformance<D: BlockDevice>(d: &D, capacity: u64) {
    assert_eq!(d.capacity(), capacity);
    assert_eq!(d.capacity() % ALIGN as u64, 0);

    // Never-written ranges of a sparse file read as zeros.
    let r = d
        .read(8 << 20, d.buffers().get(8192).await)
        .await
        .expect("read hole");
    assert!(r.as_slice().iter().all(|b| *b == 0));

    // Round trips of several sizes, including a whole chunk, and at the last block.
    for (i, (offset, len)) in [(0u64, 4096usize), (4096, 8192), (1 << 20, 1 << 20)]
        .into_iter()
        .chain([(capacity - 4096, 4096)])
        .enumerate()
    {
        d.write(offset, filled(d, i as u8, len).await)
            .await
            .expect("write");
        let r = d
            .read(offset, d.buffers().get(len).await)
            .await
            .expect("read");
        assert!(
            r.as_slice() == pattern(i as u8, len).as_slice(),
            "round trip at {offset}"
        );
    }
    d.flush().await.expect("flush");

    // A window inside a larger buffer: only the window moves.
    let mut b = AlignedBuf::zeroed(3 * 4096);
    b.as_mut_slice().fill(0xEE);
    b.set_window(4096, 4096);
    b.as_mut_slice().fill(0x11);
    d.write(12 << 20, b).await.expect("windowed write");
    let r = d
        .read(12 << 20, AlignedBuf::zeroed(4096))
        .await
        .expect("read");
    assert!(r.as_slice().iter().all(|x| *x == 0x11));

    // The contract is enforced.
    assert!(matches!(
        d.read(100, AlignedBuf::zeroed(4096)).await,
        Err(DeviceError::Unaligned { .. })
    ));
    assert!(matches!(
        d.write(capacity, AlignedBuf::zeroed(4096)).await,
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.read(capacity - 4096, AlignedBuf::zeroed(8192)).await,
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(!DeviceError::Unaligned { offset: 1, len: 1 }.is_device_failure());

    // Many requests at once, more than the pool's 4 KiB class holds.
    let writes = (0..96u64).map(|i| async move {
        let b = filled(d, i as u8, 4096).await;
        d.write((16 << 20) + i * 4096, b).await.map(|_| ())
    });
    for w in join_all(writes).await {
        w.expect("parallel write");
    }
    let reads = (0..96u64).map(|i| async move {
        let b = d.buffers().get(4096).await;
        d.read((16 << 20) + i * 4096, b)
            .await
            .map(|b| (i, b.as_slice().to_vec()))
    });
    for r in join_all(reads).await {
        let (i, data) = r.expect("parallel read");
        assert_eq!(data, pattern(i as u8, 4096));
    }
    d.flush().await.expect("flush");

    // Log writes (group commit where the device has it): a burst of records of mixed sizes
    // that continue each other, arriving in any order, with a gap and a windowed buffer, mixed
    // with plain writes elsewhere; each caller gets its own buffer back and every byte lands.
    log_writes(d, 20 << 20).await;
    d.flush().await.expect("flush");

    // Discard: the range may read as anything afterwards, but the device stays usable.
    d.discard(1 << 20, 1 << 20).await.expect("discard");
    d.write(1 << 20, filled(d, 9, 4096).await)
        .await
        .expect("write after discard");
    let r = d
        .read(1 << 20, AlignedBuf::zeroed(4096))
        .await
        .expect("read");
    assert_eq!(r.as_slice(), pattern(9, 4096).as_slice());
}

/// Write a burst of log records from `base` and read them back.
async fn log_writes<D: BlockDevice>(d: &D, base: u64) {
    let mut ranges = Vec::new();
    let mut at = base;
    for i in 0..80usize {
        // One whole-chunk record (a chunk and its header page); the others small.
        let len = 4096
            * if i == 5 {
                257
            } else {
                [1, 2, 1, 9, 1, 3][i % 6]
            };
        if i == 40 {
            at += 4096; // a gap: records on either side are not merged across it
        }
        ranges.push((at, len));
        at += len as u64;
    }
    // Submitted in an order other than the device order.
    let order: Vec<usize> = (0..ranges.len()).map(|i| (i * 37) % ranges.len()).collect();
    let writes = order.iter().map(|&i| {
        let (offset, len) = ranges[i];
        async move {
            let b = if i == 7 {
                let mut b = AlignedBuf::zeroed(len + 8192);
                b.set_window(4096, len);
                b.as_mut_slice().copy_from_slice(&pattern(i as u8, len));
                b
            } else {
                filled(d, i as u8, len).await
            };
            let back = d.write_log(offset, b).await.map(|b| b.len());
            (i, back)
        }
    });
    let plain = (0..8u64).map(|i| async move {
        let b = filled(d, 200 + i as u8, 4096).await;
        d.write(base - (64 << 10) + i * 4096, b).await.map(|_| ())
    });
    let (logs, plains) = tokio::join!(join_all(writes), join_all(plain));
    for (i, back) in logs {
        assert_eq!(
            back.expect("log write"),
            ranges[i].1,
            "record {i} got its buffer"
        );
    }
    for p in plains {
        p.expect("plain write beside the log");
    }
    for (i, (offset, len)) in ranges.iter().enumerate() {
        let r = d
            .read(*offset, AlignedBuf::zeroed(*len))
            .await
            .expect("read log");
        assert!(
            r.as_slice() == pattern(i as u8, *len).as_slice(),
            "log record {i} at {offset}"
        );
    }
}

/// Poll a set of futures to completion on this task (no `futures` dependency).
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

const CAP: u64 = 32 << 20;

#[tokio::test]
async fn uring_device_conforms() {
    let f = Scratch::new("uring", CAP);
    let d = UringDevice::open(&f.0, &DeviceOptions::small()).expect("open");
    conformance(&d, CAP).await;
    // Group commit does happen: a burst of log writes arriving while one is in flight goes
    // in fewer device writes than records (a few bursts, in case the ring thread kept up).
    let mut merged = 0;
    for burst in 0..10u64 {
        log_writes(&d, (4 << 20) + burst * (2 << 20)).await;
        merged = d.log_writes_merged();
        if merged > 0 {
            break;
        }
    }
    assert!(merged > 0, "no log write was ever merged");
    drop(d);
    // The lock is released on drop: the device reopens.
    UringDevice::open(&f.0, &DeviceOptions::small()).expect("reopen");
}

#[tokio::test]
async fn file_device_conforms() {
    let f = Scratch::new("file", CAP);
    conformance(
        &FileDevice::open(&f.0, &DeviceOptions::small()).expect("open"),
        CAP,
    )
    .await;
}

#[tokio::test]
async fn faulty_device_conforms_with_and_without_a_volatile_cache() {
    let f = Scratch::new("faulty", CAP);
    let d = FaultyDevice::new(
        UringDevice::open(&f.0, &DeviceOptions::small()).expect("open"),
        1,
    );
    conformance(&d, CAP).await;
    d.set_volatile_cache(true);
    conformance(&d, CAP).await;
    assert_eq!(d.unflushed(), 2, "the discard and the write after it");
    d.flush().await.expect("flush");
    assert_eq!(d.unflushed(), 0);
}

#[tokio::test]
async fn a_second_open_of_a_device_is_refused() {
    let f = Scratch::new("busy", CAP);
    let _a = FileDevice::open(&f.0, &DeviceOptions::small()).expect("open");
    assert!(matches!(
        UringDevice::open(&f.0, &DeviceOptions::small()),
        Err(DeviceError::Busy(_))
    ));
}

#[tokio::test]
async fn faulty_device_injects_eio_flips_and_latency() {
    let f = Scratch::new("inject", CAP);
    let d = FaultyDevice::new(
        FileDevice::open(&f.0, &DeviceOptions::small()).expect("open"),
        7,
    );
    d.write(0, filled(&d, 1, 8192).await).await.expect("write");

    d.add_eio(EioRule::always(FaultOp::Read, Some(4096..4097)));
    let e = d
        .read(0, AlignedBuf::zeroed(8192))
        .await
        .expect_err("EIO on the range");
    assert!(e.is_device_failure());
    assert!(
        d.read(0, AlignedBuf::zeroed(4096)).await.is_ok(),
        "outside the range"
    );
    assert!(
        d.write(4096, AlignedBuf::zeroed(4096)).await.is_ok(),
        "writes are not covered"
    );

    d.add_eio(EioRule {
        op: FaultOp::Flush,
        range: None,
        probability: 1.0,
        times: Some(1),
    });
    assert!(d.flush().await.is_err(), "first flush fails");
    assert!(d.flush().await.is_ok(), "the rule retired");
    assert_eq!(d.injected(), 2);

    d.clear_faults();
    d.write(0, filled(&d, 1, 4096).await).await.expect("write");
    d.add_bit_flips(0..4096, 1.0);
    let r = d.read(0, AlignedBuf::zeroed(4096)).await.expect("read");
    let diff: u32 = r
        .as_slice()
        .iter()
        .zip(pattern(1, 4096))
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    assert_eq!(diff, 1, "exactly one bit flipped");

    d.clear_faults();
    d.set_latency(Some((Duration::from_millis(20), Duration::from_millis(30))));
    let t = std::time::Instant::now();
    d.read(0, AlignedBuf::zeroed(4096)).await.expect("read");
    assert!(t.elapsed() >= Duration::from_millis(20));
}

#[tokio::test]
async fn power_loss_drops_or_tears_unflushed_writes() {
    let f = Scratch::new("crash", CAP);
    let d = FaultyDevice::new(
        FileDevice::open(&f.0, &DeviceOptions::small()).expect("open"),
        42,
    );
    d.set_volatile_cache(true);
    d.write(0, filled(&d, 1, 4096).await).await.expect("write");
    d.flush().await.expect("flush");
    d.write(0, filled(&d, 2, 4096).await).await.expect("write");
    let r = d.read(0, AlignedBuf::zeroed(4096)).await.expect("read");
    assert_eq!(
        r.as_slice(),
        pattern(2, 4096).as_slice(),
        "reads see the cache"
    );
    let rep = d.crash(CrashMode::DropUnflushed).await.expect("crash");
    assert_eq!((rep.dropped, rep.applied), (1, 0));
    let r = d.read(0, AlignedBuf::zeroed(4096)).await.expect("read");
    assert_eq!(
        r.as_slice(),
        pattern(1, 4096).as_slice(),
        "the flushed data survives"
    );

    // Torn writes: every sector is either the old or the new one.
    for i in 0..32u64 {
        d.write(i * 8192, filled(&d, 3, 8192).await)
            .await
            .expect("write");
    }
    let rep = d
        .crash(CrashMode::Partial { tear: true })
        .await
        .expect("crash");
    assert_eq!(rep.applied + rep.dropped, 32);
    assert!(
        rep.torn > 0 && rep.dropped > 0,
        "seed 42 tears some and drops some: {rep:?}"
    );
    let new = pattern(3, 8192);
    let old = pattern(1, 4096);
    for i in 0..32u64 {
        let r = d
            .read(i * 8192, AlignedBuf::zeroed(8192))
            .await
            .expect("read");
        for s in 0..8192 / SECTOR {
            let sector = s * SECTOR..(s + 1) * SECTOR;
            let got = &r.as_slice()[sector.clone()];
            let old_ok = if i == 0 && s < 4096 / SECTOR {
                got == &old[sector.clone()]
            } else {
                got.iter().all(|b| *b == 0)
            };
            assert!(
                old_ok || got == &new[sector],
                "sector {s} of write {i} is neither old nor new"
            );
        }
    }
}

/// A device another process (here: another open file description) holds locked is refused
/// with a clear `Busy`; `open_when_free` waits for the holder to let go, up to its limit.
#[tokio::test]
async fn a_locked_device_is_waited_for_then_opened() {
    let f = Scratch::new("locked", 16 << 20);
    let holder = FileDevice::open(&f.0, &DeviceOptions::small()).expect("open device");
    let e = AnyDevice::open_when_free(
        &f.0,
        false,
        &DeviceOptions::small(),
        Duration::from_millis(120),
    )
    .await
    .err()
    .expect("opened a device someone holds");
    assert!(matches!(e, DeviceError::Busy(_)), "{e}");
    assert!(e.to_string().contains("stop that process"), "{e}");

    let path = f.0.clone();
    let waiter = tokio::spawn(async move {
        AnyDevice::open_when_free(
            &path,
            true,
            &DeviceOptions::small(),
            Duration::from_secs(30),
        )
        .await
    });
    // Let it find the lock held a few times before the holder goes.
    tokio::time::sleep(LOCK_RETRY * 3).await;
    assert!(!waiter.is_finished(), "did not wait for the lock");
    drop(holder);
    let dev = waiter
        .await
        .expect("join")
        .expect("open once the holder let go");
    assert_eq!(dev.capacity(), 16 << 20);
}
