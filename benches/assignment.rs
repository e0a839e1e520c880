//! How long computing the assignment takes (every node does it on each change of the live
//! runner set, and clients cache it).

use std::hint::black_box;
use std::num::NonZeroU32;

use criterion::{Criterion, criterion_group, criterion_main};
use shoal::ids::RunnerId;
use shoal::sharding::{Sharding, assign};

fn bench_assign(c: &mut Criterion) {
    let sharding = Sharding::new(NonZeroU32::new(1024).expect("non-zero"));
    for runners in [3, 10, 50] {
        let ids: Vec<RunnerId> = (1..=runners)
            .map(|i| RunnerId::new(i).expect("positive"))
            .collect();
        c.bench_function(&format!("assign 1024 shards to {runners} runners"), |b| {
            b.iter(|| assign(black_box(sharding), black_box(&ids)))
        });
    }
    c.bench_function("shard_of", |b| {
        b.iter(|| sharding.shard_of_key(black_box("user-1234567")))
    });
}

criterion_group!(benches, bench_assign);
criterion_main!(benches);
