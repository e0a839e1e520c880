//! In-process dispatch: volatile messages through the entity runtime (shard supervisor →
//! entity actor → reply), 64 concurrent callers over 1,000 entities, no network, no storage
//! on the path. The ceiling of what a runner's actors can do.

use std::num::NonZeroU32;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use shoal::entity::{Entity, EntityContext, EntityProtocol, EntityRegistry, HandlerError};
use shoal::entity_runtime::{EntityRuntime, RuntimeConfig};
use shoal::ids::{EntityAddress, EntityId, EntityType};
use shoal::sharding::Sharding;
use shoal::transport::Delivery;

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum Msg {
    Ping {},
}

struct Pong;

impl EntityProtocol for Pong {
    const NAME: &'static str = "pong";
    type Message = Msg;
    type Reply = u64;
    fn is_persisted(_: &Msg) -> bool {
        false
    }
}

impl Entity for Pong {
    type State = u64;
    async fn handle(
        &self,
        _: &EntityContext,
        state: &mut u64,
        _: Msg,
    ) -> Result<u64, HandlerError> {
        *state += 1;
        Ok(*state)
    }
}

const CALLERS: usize = 64;
const ENTITIES: usize = 1000;
const PER_ITER: usize = 20_000;

fn bench_dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sharding = Sharding::new(NonZeroU32::new(64).expect("non-zero"));
    let runtime = rt.block_on(async {
        let mut registry = EntityRegistry::new();
        registry.register(Pong).expect("registers");
        let config = RuntimeConfig {
            sharding,
            ..RuntimeConfig::default()
        };
        EntityRuntime::standalone(registry, config).await.0
    });
    let addresses: Arc<Vec<EntityAddress>> = Arc::new(
        (0..ENTITIES)
            .map(|i| EntityAddress {
                entity_type: EntityType::new("pong").expect("valid"),
                entity_id: EntityId::new(format!("e{i}")).expect("valid"),
            })
            .collect(),
    );
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(PER_ITER as u64));
    group.sample_size(10);
    group.bench_function("volatile, 64 callers, 1000 entities", |b| {
        b.to_async(&rt).iter(|| {
            let runtime = runtime.clone();
            let addresses = addresses.clone();
            async move {
                let mut callers = Vec::with_capacity(CALLERS);
                for caller in 0..CALLERS {
                    let runtime = runtime.clone();
                    let addresses = addresses.clone();
                    callers.push(tokio::spawn(async move {
                        for i in (caller..PER_ITER).step_by(CALLERS) {
                            let delivery = Delivery::Volatile {
                                address: addresses[i % ENTITIES].clone(),
                                tag: "ping".to_owned(),
                                payload: serde_json::json!({}),
                            };
                            runtime.deliver(delivery).await.expect("delivered");
                        }
                    }));
                }
                for caller in callers {
                    caller.await.expect("joins");
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_dispatch);
criterion_main!(benches);
