//! Cost of the chunk store's write path on the pread/pwrite device over a real file system
//! (not tmpfs). Ignored by default; timing never decides pass or fail:
//!
//! `SDS_BENCH_DIR=/var/tmp cargo test -p sds --release --test journal_cost -- --ignored --nocapture`

use proto::{ChunkId, ChunkIndex, VtreeId};
use sds::chunk_store::ChunkStore;
use sds::device::{AnyDevice, DeviceOptions};
use std::sync::Arc;
use std::time::Instant;

fn c(i: u64) -> ChunkId {
    ChunkId::new(VtreeId(1), ChunkIndex(i))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn cost_of_4k_writes_and_flushes() {
    let dir = std::env::var("SDS_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let img = dir.join(format!("mb-journal-cost-{}.img", std::process::id()));
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(2 << 30))
        .expect("img");
    let dev = AnyDevice::open(&img, false, &DeviceOptions::default()).expect("device");
    let s = Arc::new(ChunkStore::open(dev).await.expect("store"));
    let block = vec![0x5au8; 4096];

    let t = Instant::now();
    for i in 0..10_000u64 {
        s.write(c(i % 64), ((i / 64) % 256 * 4096) as u32, &block)
            .await
            .expect("write");
    }
    let writes = t.elapsed();
    s.flush().await.expect("flush");
    println!(
        "QD1: 10k 4 KiB writes {:?}, then flush {:?}",
        writes,
        t.elapsed() - writes
    );

    let t = Instant::now();
    let mut tasks = Vec::new();
    for q in 0..32u64 {
        let (s, block) = (s.clone(), block.clone());
        tasks.push(tokio::spawn(async move {
            for k in 0..313u64 {
                let i = q * 313 + k;
                s.write(c(100 + i % 64), ((i / 64) % 256 * 4096) as u32, &block)
                    .await
                    .expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    let writes = t.elapsed();
    s.flush().await.expect("flush");
    println!(
        "QD32: 10k 4 KiB writes {:?}, then flush {:?}",
        writes,
        t.elapsed() - writes
    );

    let t = Instant::now();
    for i in 0..1000u64 {
        s.write(c(200 + i % 16), ((i / 16) % 256 * 4096) as u32, &block)
            .await
            .expect("write");
        s.flush().await.expect("flush");
    }
    println!("QD1: 1000 x (4 KiB write + flush) {:?}", t.elapsed());
    drop(s);
    let _ = std::fs::remove_file(&img);
}
