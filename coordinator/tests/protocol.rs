//! The control protocol against a real server: registration, rendezvous, leases, field
//! validation, checkpoints, completion and journal replay.

mod common;

use std::time::Duration;

use common::*;
use proto::wire::{
    acquire_shard_response::Outcome, command::Kind, AcquireShardRequest, CheckpointRef,
    CollectiveBackend, CommitCheckpointRequest, CompleteShardRequest, JobPhase, RegisterRequest,
    RenewLeaseRequest, ReportCorruptShardRequest, Role, ShardLease, ShardState, ShardStatusRequest,
    WorkerState,
};

const CHECKSUM: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn commit(id: &str, generation: u64, step: u64) -> CommitCheckpointRequest {
    CommitCheckpointRequest {
        worker_id: id.into(),
        generation,
        checkpoint: Some(CheckpointRef {
            step,
            path: format!("checkpoints/step-{step:08}"),
            checksum: CHECKSUM.into(),
            epoch: 0,
            epoch_step: step,
        }),
    }
}

async fn expect_join(w: &mut Worker) -> proto::wire::JoinGroup {
    match w.next().await.unwrap() {
        Kind::Join(j) => j,
        other => panic!("{}: expected JoinGroup, got {other:?}", w.id),
    }
}

async fn expect_checkpoint_at(w: &mut Worker) -> u64 {
    match w.next().await.unwrap() {
        Kind::Checkpoint(c) => c.step,
        other => panic!("{}: expected CheckpointAt, got {other:?}", w.id),
    }
}

#[tokio::test]
async fn a_worker_of_another_protocol_version_is_refused_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let running = serve(spec(&[]), dir.path(), false, None).await;
    let mut c = connect(&running).await;
    let err = c
        .register(RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION + 1,
            ..register_request(Role::Trainer, 7001)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        format!(
            "worker speaks protocol v{}, coordinator v{}",
            proto::PROTOCOL_VERSION + 1,
            proto::PROTOCOL_VERSION
        )
    );
    assert_eq!(running.metrics().rejected("protocol_version"), 1);
    let ok = c
        .register(register_request(Role::Trainer, 7001))
        .await
        .unwrap();
    let ok = ok.into_inner();
    assert_eq!(ok.image_count, 96);
    assert_eq!(ok.job_hash, spec(&[]).hash_hex());
    assert!(ok.job_toml.contains("[trainers]"));
}

#[tokio::test]
async fn a_world_forms_at_max_and_a_lost_member_starts_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let job = spec(&["trainers.min=1", "trainers.max=2", "trainers.join_wait_s=1"]);
    let running = serve(job, dir.path(), false, None).await;
    let mut a = Worker::start(&running, Role::Trainer, 7001).await;
    let mut b = Worker::start(&running, Role::Trainer, 7002).await;
    let ja = expect_join(&mut a).await;
    let jb = expect_join(&mut b).await;
    assert_eq!((ja.generation, ja.rank, ja.world_size), (1, 0, 2));
    assert_eq!((jb.generation, jb.rank, jb.world_size), (1, 1, 2));
    assert_eq!(ja.backend, CollectiveBackend::Ring as i32);
    assert_eq!(ja.ring_peers, ["127.0.0.1:7001", "127.0.0.1:7002"]);
    assert_eq!(ja.resume, None);
    assert_eq!(ja.total_steps, 96); // 4 epochs of 96 / 4 = 24 steps
    assert_eq!(expect_checkpoint_at(&mut a).await, 10);
    a.report(WorkerState::Training, 1, 10);
    b.report(WorkerState::Training, 1, 10);
    a.client
        .commit_checkpoint(commit(&a.id, 1, 10))
        .await
        .unwrap();
    assert_eq!(expect_checkpoint_at(&mut a).await, 20);

    drop(b); // its stream closes: a lost member
    match a.next().await.unwrap() {
        Kind::Abort(abort) => assert_eq!(abort.generation, 1),
        other => panic!("expected AbortGroup, got {other:?}"),
    }
    let s = wait_for(&running, "RECOVERING", |s| {
        s.phase == JobPhase::Recovering as i32
    })
    .await;
    assert_eq!(s.restarts, 1);
    a.report(WorkerState::Idle, 1, 10);
    // Fewer than max: the survivor forms generation 2 alone after the join wait.
    let j = expect_join(&mut a).await;
    assert_eq!((j.generation, j.rank, j.world_size), (2, 0, 1));
    assert_eq!(j.resume.map(|r| r.step), Some(10));
    let s = wait_for(&running, "TRAINING", |s| {
        s.phase == JobPhase::Training as i32
    })
    .await;
    assert_eq!(s.generation, 2);
}

async fn acquire(c: &mut proto::client::Client, id: &str) -> Outcome {
    c.acquire_shard(AcquireShardRequest {
        worker_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .outcome
    .unwrap()
}

fn lease(o: Outcome) -> ShardLease {
    match o {
        Outcome::Lease(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn done(id: &str, l: &ShardLease) -> CompleteShardRequest {
    CompleteShardRequest {
        worker_id: id.into(),
        shard: l.shard,
        lease_id: l.lease_id,
        file: format!("shard-{:05}.bin", l.shard),
        checksum: CHECKSUM.into(),
        bytes: 1234,
        images: l.image_count,
    }
}

#[tokio::test]
async fn an_expired_lease_is_reissued_a_stale_one_refused_and_corruption_requeues() {
    let dir = tempfile::tempdir().unwrap();
    let running = serve(spec(&["teachers.lease_s=3"]), dir.path(), false, None).await;
    let mut c = connect(&running).await;
    let t1 = c
        .register(register_request(Role::Teacher, 0))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let t2 = c
        .register(register_request(Role::Teacher, 0))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let first = lease(acquire(&mut c, &t1).await);
    assert_eq!(first.image_count, 16);
    assert_eq!(first.expires_in_ms, 3000);
    // t1 goes silent; after the lease time its shard goes to t2.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let second = lease(acquire(&mut c, &t2).await);
    assert_eq!(second.shard, first.shard);
    assert_ne!(second.lease_id, first.lease_id);
    let renew = c
        .renew_lease(RenewLeaseRequest {
            worker_id: t1.clone(),
            shard: first.shard,
            lease_id: first.lease_id,
            images_done: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!renew.ok, "the lease was re-issued");
    let err = c.complete_shard(done(&t1, &first)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(running.metrics().rejected("stale_lease"), 1);
    c.complete_shard(done(&t2, &second)).await.unwrap();
    let st = c
        .shard_status(ShardStatusRequest {
            shard: second.shard,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.state, ShardState::Done as i32);
    assert_eq!(st.checksum, CHECKSUM);

    let trainer = c
        .register(register_request(Role::Trainer, 7001))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let corrupt = |checksum: &str| ReportCorruptShardRequest {
        worker_id: trainer.clone(),
        shard: second.shard,
        checksum: checksum.into(),
        image_id: 1,
        reason: "checksum mismatch".into(),
    };
    let other = "f".repeat(64);
    let r = c
        .report_corrupt_shard(corrupt(&other))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.requeued, "another file's checksum does not requeue");
    let r = c
        .report_corrupt_shard(corrupt(CHECKSUM))
        .await
        .unwrap()
        .into_inner();
    assert!(r.requeued);
    let st = c
        .shard_status(ShardStatusRequest {
            shard: second.shard,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.state, ShardState::Pending as i32);
    let again = lease(acquire(&mut c, &t1).await);
    assert_eq!(
        again.shard, second.shard,
        "the requeued shard is first in order again"
    );
}

#[tokio::test]
async fn invalid_fields_are_refused_counted_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let running = serve(
        spec(&["trainers.min=1", "trainers.max=1"]),
        dir.path(),
        false,
        None,
    )
    .await;
    let mut a = Worker::start(&running, Role::Trainer, 7001).await;
    assert_eq!(expect_join(&mut a).await.generation, 1);
    // A second trainer outside the world of one.
    let mut c = connect(&running).await;
    let reg_b = c
        .register(register_request(Role::Trainer, 7002))
        .await
        .unwrap()
        .into_inner();
    let b_id = reg_b.worker_id.clone();
    let before = wait_for(&running, "generation 1", |s| s.generation == 1).await;

    let cases = [
        (
            "rank_outside_world",
            report(&b_id, WorkerState::Training, 1, 1),
            tonic::Code::FailedPrecondition,
        ),
        (
            "unknown_generation",
            report(&b_id, WorkerState::Training, 7, 1),
            tonic::Code::FailedPrecondition,
        ),
        (
            "step_from_future",
            report(&b_id, WorkerState::Idle, 0, 1_000_000),
            tonic::Code::InvalidArgument,
        ),
        (
            "negative_count",
            proto::wire::WorkerReport {
                images_per_s: -5.0,
                ..report(&b_id, WorkerState::Idle, 0, 0)
            },
            tonic::Code::InvalidArgument,
        ),
    ];
    for (reason, bad, code) in cases {
        let mut b = Worker::attach(connect(&running).await, reg_b.clone()).await;
        b.send(bad);
        let err = b.ended().await.unwrap_err();
        assert_eq!(err.code(), code, "{reason}: {err}");
        assert_eq!(running.metrics().rejected(reason), 1, "{reason}");
    }
    let err = c.commit_checkpoint(commit(&b_id, 1, 1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(running.metrics().rejected("commit_not_rank0"), 1);
    // Rank 0 has reported no step yet: a checkpoint at step 8 is from the future.
    let err = a
        .client
        .commit_checkpoint(commit(&a.id, 1, 8))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(running.metrics().rejected("step_from_future"), 2);
    let err = a
        .client
        .commit_checkpoint(commit(&a.id, 9, 8))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let after = status(&mut c).await;
    assert_eq!(after.phase, before.phase);
    assert_eq!(after.generation, 1);
    assert_eq!(after.world_size, 1);
    assert_eq!(after.last_checkpoint, None);
    assert_eq!(after.restarts, 0);
    let rank0 = &after.ranks[0];
    assert_eq!((rank0.rank, &rank0.worker_id), (0, &a.id));
    // Rank 0 is untouched: its stream still works.
    a.report(WorkerState::Training, 1, 10);
    a.client
        .commit_checkpoint(commit(&a.id, 1, 10))
        .await
        .unwrap();
}

#[tokio::test]
async fn checkpoints_every_n_steps_then_completion_stops_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let job = spec(&[
        "trainers.min=1",
        "trainers.max=1",
        "train.max_steps=10",
        "checkpoint.every_steps=4",
        "checkpoint.keep=2",
    ]);
    let running = serve(job, dir.path(), false, None).await;
    let mut teacher = Worker::start(&running, Role::Teacher, 0).await;
    let mut a = Worker::start(&running, Role::Trainer, 7001).await;
    let j = expect_join(&mut a).await;
    assert_eq!(j.total_steps, 10);
    let mut at = expect_checkpoint_at(&mut a).await;
    let mut steps = Vec::new();
    loop {
        steps.push(at);
        let state = if at == 10 {
            WorkerState::Done
        } else {
            WorkerState::Training
        };
        a.report(state, 1, at);
        a.client
            .commit_checkpoint(commit(&a.id, 1, at))
            .await
            .unwrap();
        if at == 10 {
            break;
        }
        at = expect_checkpoint_at(&mut a).await;
    }
    assert_eq!(steps, [4, 8, 10]);
    for w in [&mut a, &mut teacher] {
        match w.next().await.unwrap() {
            Kind::Stop(_) => {}
            other => panic!("expected Stop, got {other:?}"),
        }
        w.ended().await.unwrap();
    }
    let s = running.status();
    assert_eq!(s.phase, JobPhase::Completed as i32);
    assert_eq!(s.last_checkpoint.map(|c| c.step), Some(10));
    // The job is complete already; the deadline only catches a hang.
    let phase = tokio::time::timeout(Duration::from_secs(120), running.finished())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(phase, JobPhase::Completed);
    let journal = coordinator::journal::read(&dir.path().join("journal.jsonl")).unwrap();
    let commits = journal
        .iter()
        .filter(|r| matches!(r, coordinator::journal::Record::Committed { .. }))
        .count();
    assert_eq!(commits, 3);
}

#[tokio::test]
async fn a_restarted_coordinator_replays_its_journal_and_workers_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    let job = || spec(&["trainers.min=1", "trainers.max=1"]);
    let running = serve(job(), dir.path(), false, None).await;
    let mut a = Worker::start(&running, Role::Trainer, 7001).await;
    expect_join(&mut a).await;
    a.report(WorkerState::Training, 1, 10);
    a.client
        .commit_checkpoint(commit(&a.id, 1, 10))
        .await
        .unwrap();
    let mut c = connect(&running).await;
    let t = c
        .register(register_request(Role::Teacher, 0))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let l = lease(acquire(&mut c, &t).await);
    c.complete_shard(done(&t, &l)).await.unwrap();
    let before = status(&mut c).await;
    let a_id = a.id.clone();
    drop((a, c));
    drop(running); // the coordinator dies; only the journal remains

    let running = serve(job(), dir.path(), true, None).await;
    let mut c = connect(&running).await;
    let after = status(&mut c).await;
    assert_eq!(after.generation, before.generation);
    assert_eq!(after.last_checkpoint, before.last_checkpoint);
    assert_eq!(after.teacher_progress.unwrap().shards_done, 1);
    assert_eq!(after.phase, JobPhase::Recovering as i32);
    let st = c
        .shard_status(ShardStatusRequest { shard: l.shard })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (st.state, st.checksum.as_str()),
        (ShardState::Done as i32, CHECKSUM)
    );

    // The trainer reconnects with its id and rejoins; the next generation continues.
    let again = c
        .register(RegisterRequest {
            worker_id: a_id.clone(),
            ..register_request(Role::Trainer, 7001)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.worker_id, a_id);
    let mut a = Worker::attach(connect(&running).await, again).await;
    let j = expect_join(&mut a).await;
    assert_eq!(j.generation, 2);
    assert_eq!(j.resume.map(|r| r.step), Some(10));
    let unknown = c
        .register(RegisterRequest {
            worker_id: "w999".into(),
            ..register_request(Role::Trainer, 7003)
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}
