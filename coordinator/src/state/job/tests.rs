use super::*;

fn spec() -> JobSpec {
    let mut spec = proto::job::load(
        &proto::job::DEMO_CONFIG,
        std::iter::empty::<(String, String)>(),
        &[
            "trainers.min=1".to_string(),
            "trainers.max=2".to_string(),
            "trainers.join_wait_s=10".to_string(),
            "checkpoint.every_steps=4".to_string(),
            "train.max_steps=10".to_string(),
        ],
    )
    .unwrap()
    .spec;
    spec.teachers.lease_s = 30;
    spec
}

fn state(now: Instant) -> JobState {
    let cfg = JobConfig::from_spec(&spec(), 96).unwrap();
    JobState::new(cfg, None, now).unwrap()
}

fn trainer(s: &mut JobState, port: u16, now: Instant) -> (String, u64) {
    let resp = s
        .register(
            &RegisterRequest {
                protocol_version: proto::PROTOCOL_VERSION,
                role: Role::Trainer as i32,
                host: "h".into(),
                devices: vec!["cpu".into()],
                ring_address: format!("127.0.0.1:{port}"),
                rank_hint: -1,
                ..Default::default()
            },
            now,
        )
        .unwrap();
    let session = s.attach(&resp.worker_id, now).unwrap();
    (resp.worker_id, session)
}

fn report(id: &str, state: WorkerState, generation: u64, step: u64) -> WorkerReport {
    WorkerReport {
        worker_id: id.into(),
        state: state as i32,
        generation,
        step,
        ..Default::default()
    }
}

fn joins(out: &[Outgoing]) -> Vec<(String, JoinGroup)> {
    out.iter()
        .filter_map(|o| match o {
            Outgoing::Send(
                id,
                Command {
                    kind: Some(command::Kind::Join(j)),
                },
            ) => Some((id.clone(), j.clone())),
            _ => None,
        })
        .collect()
}

fn ckpt_req(id: &str, generation: u64, step: u64) -> CommitCheckpointRequest {
    CommitCheckpointRequest {
        worker_id: id.into(),
        generation,
        checkpoint: Some(CheckpointRef {
            step,
            path: format!("checkpoints/step-{step}"),
            checksum: "c".repeat(64),
            epoch: 0,
            epoch_step: step,
        }),
    }
}

#[test]
fn total_steps_and_checkpoint_steps() {
    let cfg = JobConfig::from_spec(&spec(), 96).unwrap();
    // 96 images / batch 4 = 24 steps per epoch, 4 epochs, capped at 10.
    assert_eq!(cfg.total_steps, 10);
    assert_eq!(cfg.next_checkpoint(0), Some(4));
    assert_eq!(cfg.next_checkpoint(4), Some(8));
    assert_eq!(cfg.next_checkpoint(9), Some(10));
    assert_eq!(cfg.next_checkpoint(10), None);
}

#[test]
fn a_world_forms_at_max_or_at_min_after_the_wait() {
    let t0 = Instant::now();
    let mut s = state(t0);
    let (a, sa) = trainer(&mut s, 7001, t0);
    let out = s
        .report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    assert!(joins(&out).is_empty(), "one of max 2 before the wait");
    assert!(joins(&s.tick(t0 + Duration::from_secs(5)).unwrap()).is_empty());
    let out = s.tick(t0 + Duration::from_secs(11)).unwrap();
    let j = joins(&out);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].1.world_size, 1);
    assert_eq!(j[0].1.generation, 1);
    assert_eq!(j[0].1.backend, CollectiveBackend::Ring as i32);
    assert_eq!(j[0].1.ring_peers, ["127.0.0.1:7001"]);
    assert!(j[0].1.resume.is_none());
    assert_eq!(s.phase(), JobPhase::Training);
    assert!(out.contains(&Outgoing::Send(
        a.clone(),
        command(command::Kind::Checkpoint(CheckpointAt {
            generation: 1,
            step: 4
        }))
    )));
}

#[test]
fn a_lost_member_aborts_the_generation_and_the_next_resumes_from_the_checkpoint() {
    let t0 = Instant::now();
    let mut s = state(t0);
    let (a, sa) = trainer(&mut s, 7001, t0);
    let (b, sb) = trainer(&mut s, 7002, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    let out = s
        .report(&b, sb, report(&b, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    let j = joins(&out);
    assert_eq!(j.len(), 2);
    assert_eq!(j[1].1.ring_peers, ["127.0.0.1:7001", "127.0.0.1:7002"]);
    s.report(&a, sa, report(&a, WorkerState::Training, 1, 4), t0)
        .unwrap();
    s.commit_checkpoint(&ckpt_req(&a, 1, 4)).unwrap();
    // Only rank 0 commits; a step no one reported is refused.
    assert!(s.commit_checkpoint(&ckpt_req(&b, 1, 4)).is_err());
    assert!(s.commit_checkpoint(&ckpt_req(&a, 1, 8)).is_err());
    let out = s.detach(&b, sb, t0).unwrap();
    assert!(out.contains(&Outgoing::Send(
        a.clone(),
        command(command::Kind::Abort(AbortGroup {
            generation: 1,
            reason: format!("{b} lost: stream closed")
        }))
    )));
    assert_eq!(s.phase(), JobPhase::Recovering);
    let out = s
        .report(&a, sa, report(&a, WorkerState::Idle, 1, 4), t0)
        .unwrap();
    assert!(joins(&out).is_empty(), "waits for the join wait");
    let out = s.tick(t0 + Duration::from_secs(11)).unwrap();
    let j = joins(&out);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].1.generation, 2);
    assert_eq!(j[0].1.resume.as_ref().map(|r| r.step), Some(4));
}

#[test]
fn completion_needs_the_final_commit_and_done() {
    let t0 = Instant::now();
    let mut s = state(t0);
    let (a, sa) = trainer(&mut s, 7001, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    s.tick(t0 + Duration::from_secs(11)).unwrap();
    s.report(&a, sa, report(&a, WorkerState::Done, 1, 10), t0)
        .unwrap();
    assert_eq!(s.phase(), JobPhase::Training);
    let out = s.commit_checkpoint(&ckpt_req(&a, 1, 10)).unwrap();
    assert_eq!(s.phase(), JobPhase::Completed);
    assert!(out.contains(&Outgoing::Close(a.clone())));
    assert!(s.is_finished());
}

#[test]
fn a_drain_stops_after_the_stop_step_is_committed_and_members_drained() {
    let t0 = Instant::now();
    let mut s = state(t0);
    let (a, sa) = trainer(&mut s, 7001, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    s.tick(t0 + Duration::from_secs(11)).unwrap();
    s.report(&a, sa, report(&a, WorkerState::Training, 1, 2), t0)
        .unwrap();
    let out = s.drain("ctrl-c").unwrap();
    assert_eq!(
        out,
        vec![Outgoing::Send(
            a.clone(),
            command(command::Kind::Drain(Drain {
                generation: 1,
                stop_step: 3
            }))
        )]
    );
    s.report(&a, sa, report(&a, WorkerState::Training, 1, 3), t0)
        .unwrap();
    s.commit_checkpoint(&ckpt_req(&a, 1, 3)).unwrap();
    assert_eq!(s.phase(), JobPhase::Draining);
    s.report(&a, sa, report(&a, WorkerState::Drained, 1, 3), t0)
        .unwrap();
    assert_eq!(s.phase(), JobPhase::Stopped);
}

#[test]
fn a_silent_worker_is_lost_after_the_heartbeat_timeout() {
    let t0 = Instant::now();
    let mut s = state(t0);
    let (a, sa) = trainer(&mut s, 7001, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    s.tick(t0 + Duration::from_secs(11)).unwrap();
    s.report(
        &a,
        sa,
        report(&a, WorkerState::Training, 1, 1),
        t0 + Duration::from_secs(11),
    )
    .unwrap();
    let out = s.tick(t0 + Duration::from_secs(50)).unwrap();
    assert!(out.contains(&Outgoing::Close(a.clone())));
    assert_eq!(s.phase(), JobPhase::Recovering);
    assert!(s.worker(&a).unwrap().session.is_none());
}

#[test]
fn on_cuda_rank_0s_nccl_id_goes_to_every_member_once() {
    let t0 = Instant::now();
    let mut spec = spec();
    spec.trainers.device = "cuda:0".into();
    let cfg = JobConfig::from_spec(&spec, 96).unwrap();
    let mut s = JobState::new(cfg, None, t0).unwrap();
    let (a, sa) = trainer(&mut s, 0, t0);
    let (b, sb) = trainer(&mut s, 0, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    let out = s
        .report(&b, sb, report(&b, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    let j = joins(&out);
    assert_eq!(j[0].1.backend, CollectiveBackend::Nccl as i32);
    // A report without the id, or from rank 1, sends nothing.
    let mut with_id = report(&b, WorkerState::Joining, 1, 0);
    with_id.nccl_unique_id = vec![7; 128];
    assert!(s.report(&b, sb, with_id.clone(), t0).unwrap().is_empty());
    with_id.worker_id = a.clone();
    let out = s.report(&a, sa, with_id.clone(), t0).unwrap();
    let ids: Vec<&String> = out
        .iter()
        .filter_map(|o| match o {
            Outgoing::Send(
                id,
                Command {
                    kind: Some(command::Kind::NcclId(n)),
                },
            ) if n.generation == 1 && n.unique_id == vec![7; 128] => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, [&a, &b]);
    assert!(
        s.report(&a, sa, with_id, t0).unwrap().is_empty(),
        "sent once"
    );
}

#[test]
fn a_replayed_journal_gives_the_same_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let cfg = JobConfig::from_spec(&spec(), 96).unwrap();
    let (journal, _) = Journal::open(dir.path(), false).unwrap();
    let mut s = JobState::new(cfg.clone(), Some(journal), t0).unwrap();
    let (a, sa) = trainer(&mut s, 7001, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    s.tick(t0 + Duration::from_secs(11)).unwrap();
    s.report(&a, sa, report(&a, WorkerState::Training, 1, 4), t0)
        .unwrap();
    s.commit_checkpoint(&ckpt_req(&a, 1, 4)).unwrap();
    drop(s);
    let (journal, records) = Journal::open(dir.path(), true).unwrap();
    let r = JobState::replay(cfg, journal, &records, t0).unwrap();
    assert_eq!(r.generation(), 1);
    assert_eq!(r.phase(), JobPhase::Recovering);
    assert_eq!(r.checkpoints().latest_step(), 4);
    assert!(r.world().is_none());
    assert!(r.worker(&a).is_some());
}

#[test]
fn a_worker_asking_to_drain_drains_the_world_and_unknown_workers_are_refused() {
    let t0 = Instant::now();
    let mut s = state(t0);
    let (a, sa) = trainer(&mut s, 7001, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    s.tick(t0 + Duration::from_secs(11)).unwrap();
    s.report(&a, sa, report(&a, WorkerState::Training, 1, 2), t0)
        .unwrap();
    assert!(s.request_drain("w99", "SIGTERM").is_err());
    let (out, phase, stop_step) = s.request_drain(&a, "SIGTERM").unwrap();
    assert_eq!((phase, stop_step), (JobPhase::Draining, 3));
    assert_eq!(
        out,
        vec![Outgoing::Send(
            a.clone(),
            command(command::Kind::Drain(Drain {
                generation: 1,
                stop_step: 3
            }))
        )]
    );
    // A second request changes nothing.
    let (out, phase, _) = s.request_drain(&a, "SIGTERM").unwrap();
    assert!(out.is_empty());
    assert_eq!(phase, JobPhase::Draining);
}

#[test]
fn a_drained_journal_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let cfg = JobConfig::from_spec(&spec(), 96).unwrap();
    let (journal, _) = Journal::open(dir.path(), false).unwrap();
    let mut s = JobState::new(cfg.clone(), Some(journal), t0).unwrap();
    let (a, sa) = trainer(&mut s, 7001, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    s.tick(t0 + Duration::from_secs(11)).unwrap();
    s.report(&a, sa, report(&a, WorkerState::Training, 1, 2), t0)
        .unwrap();
    s.request_drain(&a, "SIGTERM").unwrap();
    s.report(&a, sa, report(&a, WorkerState::Training, 1, 3), t0)
        .unwrap();
    s.commit_checkpoint(&ckpt_req(&a, 1, 3)).unwrap();
    s.report(&a, sa, report(&a, WorkerState::Drained, 1, 3), t0)
        .unwrap();
    assert_eq!(s.phase(), JobPhase::Stopped);
    drop(s);
    let (journal, records) = Journal::open(dir.path(), true).unwrap();
    let mut r = JobState::replay(cfg, journal, &records, t0).unwrap();
    assert_eq!(r.phase(), JobPhase::Recovering);
    assert!(!r.is_finished());
    assert_eq!(r.checkpoints().latest_step(), 3);
    // The workers of the resumed job are welcome again.
    let again = RegisterRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        worker_id: a.clone(),
        role: Role::Trainer as i32,
        host: "h".into(),
        devices: vec!["cpu".into()],
        ring_address: "127.0.0.1:7001".into(),
        rank_hint: -1,
        ..Default::default()
    };
    assert!(r.register(&again, t0).is_ok());
}

#[test]
fn a_lease_that_expired_between_ticks_is_reissued_with_its_expiry_recorded() {
    let t0 = Instant::now();
    let mut s = state(t0);
    let mut teacher = || {
        s.register(
            &RegisterRequest {
                protocol_version: proto::PROTOCOL_VERSION,
                role: Role::Teacher as i32,
                host: "h".into(),
                devices: vec!["cpu".into()],
                rank_hint: -1,
                ..Default::default()
            },
            t0,
        )
        .unwrap()
        .worker_id
    };
    let (a, b) = (teacher(), teacher());
    let Acquired::Lease(first) = s.acquire_shard(&a, t0).unwrap() else {
        panic!("a gets a lease");
    };
    // No tick runs between the expiry (30 s lease) and b's acquire.
    let later = t0 + Duration::from_secs(31);
    let Acquired::Lease(second) = s.acquire_shard(&b, later).unwrap() else {
        panic!("b gets a lease");
    };
    assert_eq!(
        second.shard, first.shard,
        "the expired shard goes out first"
    );
    let events = s.status(later).recent_events;
    let expired = format!("lease of shard {} by {a} expired", first.shard);
    assert!(events.iter().any(|e| e.ends_with(&expired)), "{events:?}");
}

/// A collective that fails on the trainers' side (a ring timeout while a peer waited for
/// a recomputed cache shard) loses no process: the members come back IDLE on their own.
#[test]
fn a_member_back_to_idle_on_its_own_ends_the_generation_and_a_new_one_forms() {
    let t0 = Instant::now();
    let mut s = state(t0);
    let (a, sa) = trainer(&mut s, 7001, t0);
    let (b, sb) = trainer(&mut s, 7002, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    let out = s
        .report(&b, sb, report(&b, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    assert_eq!(joins(&out).len(), 2);
    // The IDLE that may still be in flight when the group is sent changes nothing.
    let out = s
        .report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(s.phase(), JobPhase::Training);

    s.report(&a, sa, report(&a, WorkerState::Training, 1, 2), t0)
        .unwrap();
    s.report(&b, sb, report(&b, WorkerState::WaitingForCache, 1, 2), t0)
        .unwrap();
    let out = s
        .report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    assert!(out.contains(&Outgoing::Send(
        b.clone(),
        command(command::Kind::Abort(AbortGroup {
            generation: 1,
            reason: format!(
                "{a} lost: back to IDLE: its generation ended on its side (a failed collective)"
            )
        }))
    )));
    assert!(
        !out.contains(&Outgoing::Close(a.clone())),
        "a is still attached"
    );
    assert!(s.worker(&a).unwrap().session.is_some());
    assert_eq!(s.phase(), JobPhase::Recovering);

    let out = s
        .report(&b, sb, report(&b, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    let j = joins(&out);
    assert_eq!(j.len(), 2, "both rejoin");
    assert!(j.iter().all(|(_, join)| join.generation == 2));
    assert_eq!(s.phase(), JobPhase::Training);
}

#[test]
fn live_decisions_are_handed_out_once_and_a_replay_hands_out_none() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let cfg = JobConfig::from_spec(&spec(), 96).unwrap();
    let (journal, _) = Journal::open(dir.path(), false).unwrap();
    let mut s = JobState::new(cfg.clone(), Some(journal), t0).unwrap();
    let (a, sa) = trainer(&mut s, 7001, t0);
    s.report(&a, sa, report(&a, WorkerState::Idle, 0, 0), t0)
        .unwrap();
    s.tick(t0 + Duration::from_secs(11)).unwrap();
    assert!(
        s.take_decisions().is_empty(),
        "forming a world is not counted"
    );
    s.report(&a, sa, report(&a, WorkerState::Training, 1, 4), t0)
        .unwrap();
    s.commit_checkpoint(&ckpt_req(&a, 1, 4)).unwrap();
    let failed = WorkerReport {
        error: "ring peer 1 closed".into(),
        ..report(&a, WorkerState::Failed, 1, 5)
    };
    s.report(&a, sa, failed, t0).unwrap();
    assert_eq!(
        s.take_decisions(),
        [
            Decision::CheckpointCommitted { step: 4 },
            Decision::GenerationAborted(LostReason::ReportedFailure("ring peer 1 closed".into())),
        ]
    );
    assert!(s.take_decisions().is_empty(), "each is handed out once");
    drop(s);

    let (journal, records) = Journal::open(dir.path(), true).unwrap();
    let mut r = JobState::replay(cfg.clone(), journal, &records, t0).unwrap();
    assert_eq!(r.checkpoints().latest_step(), 4);
    assert!(
        r.take_decisions().is_empty(),
        "a replay decides nothing anew"
    );
    // The typed reason was journaled as the same text as ever.
    let lost = records.iter().find_map(|rec| match rec {
        Record::Lost { reason, .. } => Some(reason.as_str()),
        _ => None,
    });
    assert_eq!(lost, Some("reported failure: ring peer 1 closed"));
    // Applying the records again (the replay path) decides nothing either.
    for record in &records {
        r.apply(record);
    }
    assert!(r.take_decisions().is_empty());
}
