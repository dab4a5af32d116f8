//! Property: a 10-stage chain with random capacities, concurrency and batch sizes passes on
//! every item exactly once (in order when every stage keeps order), and gives back its budget.

use std::time::Duration;

use deployd_pipeline::{BatchConfig, Budget, Concurrency, Input, Output, Pipeline};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Kind {
    Map {
        concurrency: usize,
        ordered: bool,
        yields: bool,
    },
    Batched {
        min: usize,
        max: usize,
        wait_ms: u64,
    },
    Custom {
        batch: Option<(usize, usize)>,
    },
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (1usize..5, any::<bool>(), any::<bool>()).prop_map(|(concurrency, ordered, yields)| {
            Kind::Map {
                concurrency,
                ordered,
                yields,
            }
        }),
        (1usize..6, 0usize..10, 0u64..5).prop_map(|(min, extra, wait_ms)| Kind::Batched {
            min,
            max: min + extra,
            wait_ms,
        }),
        proptest::option::of((1usize..4, 1usize..8)).prop_map(|batch| Kind::Custom { batch }),
    ]
}

#[derive(Debug, Clone)]
struct Chain {
    items: u64,
    stages: Vec<(usize, Kind)>,
    budget: Option<(u32, u32)>,
}

fn chain() -> impl Strategy<Value = Chain> {
    (
        0u64..400,
        proptest::collection::vec((1usize..9, kind()), 10),
        proptest::option::of((1u32..20, 1u32..200)),
    )
        .prop_map(|(items, stages, budget)| Chain {
            items,
            stages,
            budget,
        })
}

async fn pass_on(
    mut input: Input<u64>,
    mut output: Output<u64>,
    batch: Option<(usize, usize)>,
) -> Result<(), deployd_pipeline::Closed> {
    match batch {
        Some((min, max)) => {
            let config = BatchConfig::new(min, max, Duration::from_millis(1));
            while let Some(batch) = input.next_batch(config).await {
                output.put_batch(batch).await?;
            }
        }
        None => {
            while let Some(item) = input.next_item().await {
                output.put_item(item).await?;
            }
        }
    }
    Ok(())
}

/// The budget's free items and bytes after a run.
type BudgetLeft = Option<(usize, usize)>;

fn run(chain: &Chain) -> (Result<Vec<u64>, String>, BudgetLeft) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    let Ok(runtime) = runtime else {
        return (Err("no runtime".into()), None);
    };
    let budget = chain.budget.map(|(items, bytes)| Budget::new(items, bytes));
    let out = runtime.block_on(async {
        let mut p = Pipeline::from_stream(futures::stream::iter(0..chain.items));
        if let Some(budget) = &budget {
            p = p.budget(budget, |x| (*x % 50) as usize);
        }
        for (i, (capacity, kind)) in chain.stages.iter().enumerate() {
            let name = format!("s{i}");
            p = p.capacity(*capacity);
            p = match kind.clone() {
                Kind::Map {
                    concurrency,
                    ordered,
                    yields,
                } => {
                    let c = if ordered {
                        Concurrency::ordered(concurrency)
                    } else {
                        Concurrency::unordered(concurrency)
                    };
                    p.map(&name, c, move |x| async move {
                        if yields && x % 3 == 0 {
                            tokio::time::sleep(Duration::from_micros(x % 7)).await;
                        }
                        x
                    })
                }
                Kind::Batched { min, max, wait_ms } => p.batched_stage(
                    &name,
                    BatchConfig::new(min, max, Duration::from_millis(wait_ms)),
                    |batch| async move { Ok::<_, std::convert::Infallible>(batch) },
                ),
                Kind::Custom { batch } => {
                    p.custom_stage(&name, move |input, output| pass_on(input, output, batch))
                }
            };
        }
        p.collect().await.map_err(|e| e.to_string())
    });
    let left = budget.map(|b| (b.available_items(), b.available_bytes()));
    (out, left)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_item_passes_exactly_once(chain in chain()) {
        let (out, budget_left) = run(&chain);
        let mut out = out.map_err(TestCaseError::fail)?;
        let all_ordered = chain
            .stages
            .iter()
            .all(|(_, k)| !matches!(k, Kind::Map { ordered: false, concurrency, .. } if *concurrency > 1));
        let expected: Vec<u64> = (0..chain.items).collect();
        if all_ordered {
            prop_assert_eq!(&out, &expected);
        }
        out.sort_unstable();
        prop_assert_eq!(out, expected);
        if let (Some((items, bytes)), Some(left)) = (chain.budget, budget_left) {
            prop_assert_eq!(left, (items as usize, bytes as usize));
        }
    }
}
