use super::local::{LocalGroup, LocalRank};
use super::rendezvous;
use super::*;
use crate::train::optimizer::{clip_coefficient, global_norm, AdamW, AdamWSettings};
use candle_core::{Device, Var};
use std::collections::HashMap;
use std::net::TcpListener;
use std::thread;

const ROWS: usize = 10;
const STEPS: usize = 3;

/// Row `i` of the regression data: 3 inputs, 2 targets.
fn row(i: usize) -> ([f32; 3], [f32; 2]) {
    let x = i as f32;
    (
        [0.3 * x - 1.0, (0.7 * x).sin(), 1.0 / (1.0 + x)],
        [(0.2 * x).cos(), 0.1 * x - 0.4],
    )
}

/// Train `STEPS` AdamW steps (clipping active) on rank `comm.rank()`'s shard of a global batch
/// of `ROWS` rows; returns, after each step, the weight, the bias and the unused variable, then
/// the averaged gradients and their global norm.
fn train_rank(comm: &dyn Communicator, bucket_elements: usize) -> Vec<Vec<f32>> {
    let device = Device::Cpu;
    let init: Vec<f32> = (0..6).map(|i| 0.1 * i as f32 - 0.25).collect();
    let weight = Var::from_tensor(&Tensor::from_vec(init, (3, 2), &device).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::new(&[0.05f32, -0.02], &device).unwrap()).unwrap();
    // Never used by the loss: no rank has a gradient, it must stay `None` (AdamW skips it).
    let unused = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &device).unwrap()).unwrap();
    let vars = vec![
        ("weight".to_string(), weight.clone()),
        ("bias".to_string(), bias.clone()),
        ("unused".to_string(), unused.clone()),
    ];
    let mut optimizer = AdamW::new(
        vars.clone(),
        AdamWSettings {
            weight_decay: 0.01,
            ..AdamWSettings::default()
        },
    )
    .unwrap();
    let all: Vec<usize> = (0..ROWS).collect();
    let shard = shard_rows(&all, comm.rank(), comm.world_size());
    let mut history = Vec::new();
    for _ in 0..STEPS {
        let (xs, ys): (Vec<[f32; 3]>, Vec<[f32; 2]>) = shard.iter().map(|&i| row(i)).unzip();
        let x = Tensor::from_vec(xs.concat(), (shard.len(), 3), &device).unwrap();
        let y = Tensor::from_vec(ys.concat(), (shard.len(), 2), &device).unwrap();
        let prediction = x
            .matmul(weight.as_tensor())
            .unwrap()
            .broadcast_add(bias.as_tensor())
            .unwrap();
        let loss_sum = (prediction - y).unwrap().sqr().unwrap().sum_all().unwrap();
        let scale = backward_scale(comm.world_size(), ROWS);
        let store = loss_sum.affine(scale, 0.0).unwrap().backward().unwrap();
        let mut gradients: Vec<Option<Tensor>> = vars
            .iter()
            .map(|(_, v)| store.get(v.as_tensor()).cloned())
            .collect();
        let tensors: Vec<&Tensor> = vars.iter().map(|(_, v)| v.as_tensor()).collect();
        average_gradients(comm, &mut gradients, &tensors, bucket_elements).unwrap();
        assert!(
            gradients[2].is_none(),
            "a variable without gradients got one"
        );
        let norm = global_norm(&gradients).unwrap();
        let coefficient = clip_coefficient(norm, 0.05);
        assert!(coefficient < 1.0, "clipping must be active in this test");
        optimizer
            .step_scaled(&gradients, 0.01, coefficient)
            .unwrap();
        let mut snapshot = weight
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        snapshot.extend(bias.as_tensor().to_vec1::<f32>().unwrap());
        snapshot.extend(unused.as_tensor().to_vec1::<f32>().unwrap());
        // The averaged gradients themselves (Adam's update hides their scale) and their norm.
        for gradient in gradients.iter().flatten() {
            snapshot.extend(gradient.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        snapshot.push(norm as f32);
        history.push(snapshot);
    }
    history
}

fn run_group(world_size: usize, bucket_elements: usize) -> Vec<Vec<Vec<f32>>> {
    let ranks = LocalGroup::new(world_size, Duration::from_secs(20));
    let handles: Vec<_> = ranks
        .into_iter()
        .map(|rank| thread::spawn(move || train_rank(&rank, bucket_elements)))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn sharded_steps_match_the_whole_batch_and_agree_bit_for_bit() {
    let reference = train_rank(&Solo, DEFAULT_BUCKET_ELEMENTS);
    for world_size in [2, 4] {
        // Bucket of 4 elements: the 6-element weight is a bucket alone, the bias another.
        for bucket_elements in [4, DEFAULT_BUCKET_ELEMENTS] {
            let ranks = run_group(world_size, bucket_elements);
            for (rank, history) in ranks.iter().enumerate() {
                for (step, (got, want)) in history.iter().zip(&reference).enumerate() {
                    // Bit-identical parameters on every rank after every step.
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(got),
                        bits(&ranks[0][step]),
                        "world {world_size}: rank {rank} differs from rank 0 after step {}",
                        step + 1
                    );
                    // Same as one rank on the whole batch, up to f32 summation order.
                    for (g, w) in got.iter().zip(want) {
                        assert!(
                            (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                            "world {world_size} step {}: {g} vs {w} on one rank",
                            step + 1
                        );
                    }
                }
                // The parameters moved (the test would pass on a no-op otherwise).
                assert_ne!(
                    history[STEPS - 1][..8],
                    [-0.25, -0.15, -0.05, 0.05, 0.15, 0.25, 0.05, -0.02]
                );
                assert_eq!(history[STEPS - 1][8..10], [1.0, 2.0]);
            }
        }
    }
}

#[test]
fn a_gradient_missing_on_some_ranks_counts_as_zeros_there() {
    let ranks = LocalGroup::new(2, Duration::from_secs(20));
    let handles: Vec<_> = ranks
        .into_iter()
        .map(|comm| {
            thread::spawn(move || {
                let device = Device::Cpu;
                let a = Tensor::zeros(3, DType::F32, &device).unwrap();
                let b = Tensor::zeros((1, 2), DType::F32, &device).unwrap();
                let mut gradients = vec![
                    // Only rank 0 has a gradient for `a`.
                    (comm.rank() == 0).then(|| Tensor::new(&[2.0f32, 4.0, 6.0], &device).unwrap()),
                    Some(Tensor::new(&[[1.0f32 + comm.rank() as f32, 0.0]], &device).unwrap()),
                ];
                average_gradients(&comm, &mut gradients, &[&a, &b], DEFAULT_BUCKET_ELEMENTS)
                    .unwrap();
                gradients
                    .into_iter()
                    .map(|g| g.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for handle in handles {
        let gradients = handle.join().unwrap();
        assert_eq!(gradients[0], [1.0, 2.0, 3.0]);
        assert_eq!(gradients[1], [1.5, 0.0]);
    }
}

#[test]
fn shards_cover_every_row_exactly_once() {
    for rows in [0, 1, 3, 8, 10, 17] {
        for world_size in 1..=8 {
            let all: Vec<usize> = (100..100 + rows).collect();
            let mut seen: Vec<usize> = (0..world_size)
                .flat_map(|rank| shard_rows(&all, rank, world_size))
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, all, "{rows} rows over {world_size} ranks");
            let sizes: Vec<usize> = (0..world_size)
                .map(|rank| shard_rows(&all, rank, world_size).len())
                .collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }
    assert_eq!(shard_rows(&[5, 6, 7, 8, 9], 1, 2), [6, 8]);
}

fn env(pairs: &[(&str, &str)]) -> Result<World, WorldError> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    World::from_lookup(|name| map.get(name).cloned())
}

const FULL: [(&str, &str); 5] = [
    ("RANK", "3"),
    ("WORLD_SIZE", "4"),
    ("LOCAL_RANK", "1"),
    ("MASTER_ADDR", "10.0.0.1"),
    ("MASTER_PORT", "29500"),
];

#[test]
fn the_world_comes_from_the_torchrun_variables() {
    assert_eq!(env(&[]).unwrap(), World::single());
    assert_eq!(env(&[("WORLD_SIZE", "1")]).unwrap(), World::single());
    let mut pairs = FULL.to_vec();
    pairs.push(("NODE_RANK", "1"));
    assert_eq!(
        env(&pairs).unwrap(),
        World {
            rank: 3,
            world_size: 4,
            local_rank: 1,
            node_rank: 1,
            master: Some(("10.0.0.1".into(), 29500)),
        }
    );
}

#[test]
fn a_launch_needs_world_size_and_stray_variables_are_not_one() {
    let launched = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_launcher_lookup(|name| map.get(name).cloned())
    };
    // A MASTER_PORT (or MASTER_ADDR) left in a shell: `peftpipe run` trains alone.
    assert_eq!(
        launched(&[("MASTER_PORT", "29500")]).unwrap(),
        World::single()
    );
    assert_eq!(launched(&[]).unwrap(), World::single());
    // With WORLD_SIZE, the variables are read (and checked) as torchrun sets them.
    assert_eq!(launched(&FULL).unwrap().world_size, 4);
    assert!(launched(&[("WORLD_SIZE", "2")]).is_err());
}

#[test]
fn wrong_torchrun_variables_are_clear_errors() {
    let message = |pairs: &[(&str, &str)]| env(pairs).unwrap_err().to_string();
    let without = |name: &str| -> Vec<(&str, &str)> {
        FULL.iter().copied().filter(|(k, _)| *k != name).collect()
    };
    let with = |name: &'static str, value: &'static str| -> Vec<(&str, &str)> {
        FULL.iter()
            .map(|&(k, v)| if k == name { (k, value) } else { (k, v) })
            .collect()
    };
    let missing = message(&without("MASTER_PORT"));
    assert!(
        missing.contains("MASTER_PORT is not set, but RANK is"),
        "{missing}"
    );
    let rank = message(&with("RANK", "two"));
    assert!(
        rank.contains("RANK=\"two\" is not a non-negative integer"),
        "{rank}"
    );
    let port = message(&with("MASTER_PORT", "70000"));
    assert!(port.contains("MASTER_PORT=\"70000\""), "{port}");
    let range = message(&with("RANK", "4"));
    assert!(
        range.contains("RANK=4 is not below WORLD_SIZE=4"),
        "{range}"
    );
    let zero = message(&with("WORLD_SIZE", "0"));
    assert!(zero.contains("a positive integer"), "{zero}");
    let local = message(&with("LOCAL_RANK", "9"));
    assert!(local.contains("LOCAL_RANK=9"), "{local}");
    let address = message(&with("MASTER_ADDR", " "));
    assert!(address.contains("MASTER_ADDR"), "{address}");
    let node = {
        let mut pairs = FULL.to_vec();
        pairs.push(("NODE_RANK", "-1"));
        message(&pairs)
    };
    assert!(node.contains("NODE_RANK=\"-1\""), "{node}");
}

#[test]
fn a_rank_that_fails_ends_the_others_collectives() {
    let mut ranks = LocalGroup::new(3, Duration::from_secs(30));
    let mut failing = ranks.pop().unwrap();
    let started = std::time::Instant::now();
    let waiting: Vec<_> = ranks
        .into_iter()
        .map(|rank: LocalRank| {
            thread::spawn(move || {
                let buffer = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
                rank.all_reduce_sum(&buffer).map(|_| ())
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(50));
    failing.fail("out of memory at step 7");
    for handle in waiting {
        let error = handle.join().unwrap().unwrap_err().to_string();
        assert!(
            error.contains("all-reduce failed because rank 2 stopped: out of memory at step 7"),
            "{error}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // A rank that ends (its communicator dropped) fails the others too.
    let mut ranks = LocalGroup::new(2, Duration::from_secs(30));
    drop(ranks.pop());
    let error = ranks[0].barrier().unwrap_err().to_string();
    assert!(error.contains("rank 1 stopped"), "{error}");
}

#[test]
fn a_rank_that_hangs_ends_the_others_within_the_timeout() {
    let ranks = LocalGroup::new(2, Duration::from_millis(300));
    let started = std::time::Instant::now();
    let buffer = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let error = ranks[0].all_reduce_sum(&buffer).unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(5));
    assert!(
        matches!(&error, CommError::Timeout { rank: 0, waiting_for, .. } if waiting_for == &[1]),
        "{error}"
    );
    assert!(error.to_string().contains("timed out"), "{error}");
    // The late rank does not complete the withdrawn collective: it times out in turn.
    let error = ranks[1].all_reduce_sum(&buffer).unwrap_err();
    assert!(
        matches!(error, CommError::Timeout { rank: 1, .. }),
        "{error}"
    );
}

#[test]
fn mismatched_lengths_are_an_error_not_garbage() {
    let ranks = LocalGroup::new(2, Duration::from_secs(5));
    let mut ranks = ranks.into_iter();
    let (zero, one) = (ranks.next().unwrap(), ranks.next().unwrap());
    let waiter = thread::spawn(move || {
        let r = zero.all_reduce_sum(&Tensor::ones(4, DType::F32, &Device::Cpu).unwrap());
        (zero, r.map(|_| ()))
    });
    thread::sleep(Duration::from_millis(50));
    let error = one
        .all_reduce_sum(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("3 elements here, 4 on another rank"),
        "{error}"
    );
    drop(one);
    let (_zero, result) = waiter.join().unwrap();
    assert!(result.is_err());
}

#[test]
fn broadcast_and_barrier_reach_every_rank() {
    let ranks = LocalGroup::new(3, Duration::from_secs(20));
    let handles: Vec<_> = ranks
        .into_iter()
        .map(|comm| {
            thread::spawn(move || {
                let mine = Tensor::full(comm.rank() as f32, 2, &Device::Cpu).unwrap();
                let got = comm.broadcast(&mine, 2).unwrap().to_vec1::<f32>().unwrap();
                comm.barrier().unwrap();
                got
            })
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap(), [2.0, 2.0]);
    }
}

#[test]
fn the_rendezvous_hands_rank_0s_payload_to_every_rank() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let payload: Vec<u8> = (0..128u8).collect();
    let expected = payload.clone();
    let server =
        thread::spawn(move || rendezvous::serve_on(listener, 3, &payload, Duration::from_secs(20)));
    let joins: Vec<_> = [1, 2]
        .into_iter()
        .map(|rank| {
            thread::spawn(move || {
                rendezvous::join("127.0.0.1", port, rank, 3, Duration::from_secs(20))
            })
        })
        .collect();
    server.join().unwrap().unwrap();
    for join in joins {
        assert_eq!(join.join().unwrap().unwrap(), expected);
    }
}

#[test]
fn the_rendezvous_ends_within_its_timeout_with_a_clear_error() {
    // Rank 0 waits for a rank that never comes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let error = rendezvous::serve_on(listener, 2, b"id", Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(error.contains("waited 0 s for rank(s) [1]"), "{error}");
    // A rank waits for a rank 0 that never listens (the port is free again).
    let started = std::time::Instant::now();
    let error = rendezvous::join("127.0.0.1", port, 1, 2, Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        error.contains(&format!("rank 0 did not accept at 127.0.0.1:{port}")),
        "{error}"
    );
    // A rank with another world size is refused by name.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server =
        thread::spawn(move || rendezvous::serve_on(listener, 2, b"id", Duration::from_secs(20)));
    let _ = rendezvous::join("127.0.0.1", port, 1, 4, Duration::from_millis(500));
    let error = server.join().unwrap().unwrap_err().to_string();
    assert!(error.contains("has WORLD_SIZE=4, rank 0 has 2"), "{error}");
}

#[cfg(unix)]
mod launcher {
    use super::super::launch::{launch, LaunchError, LaunchPlan};
    use std::time::{Duration, Instant};

    fn plan(script: &str, devices: Vec<usize>) -> LaunchPlan {
        LaunchPlan {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            devices,
            master_port: 29517,
        }
    }

    #[test]
    fn every_rank_gets_the_torchrun_environment() {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $NODE_RANK $MASTER_ADDR $MASTER_PORT \
             $CUDA_VISIBLE_DEVICES $NCCL_NVLS_ENABLE\" > {}/rank$RANK",
            dir.path().display()
        );
        launch(&plan(&script, vec![2, 5, 7]), Duration::from_secs(30)).unwrap();
        for rank in 0..3 {
            let line = std::fs::read_to_string(dir.path().join(format!("rank{rank}"))).unwrap();
            assert_eq!(
                line.trim(),
                format!("{rank} {rank} 3 0 127.0.0.1 29517 2,5,7 0")
            );
        }
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_is_named() {
        let started = Instant::now();
        let error = launch(
            &plan(
                "if [ $RANK = 1 ]; then exit 3; fi; exec sleep 30",
                vec![0, 1, 2],
            ),
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the others were not stopped"
        );
        assert!(
            matches!(&error, LaunchError::RankFailed { rank: 1, device: 1, status, .. } if status.code() == Some(3)),
            "{error}"
        );
        assert!(
            error.to_string().contains("rank 1 (GPU 1) failed"),
            "{error}"
        );
    }

    #[test]
    fn a_run_past_the_timeout_is_stopped() {
        let started = Instant::now();
        let error = launch(
            &plan("exec sleep 30", vec![0, 1]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(&error, LaunchError::Timeout { running, .. } if running == &[0, 1]),
            "{error}"
        );
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let mut plan = plan("", vec![0, 1]);
        plan.program = "/nonexistent/peftpipe".into();
        let error = launch(&plan, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cannot start rank 0 (/nonexistent/peftpipe)"),
            "{error}"
        );
    }
}
