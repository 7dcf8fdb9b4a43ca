//! Workers register (a new id, or a restarted process under its old one), attach and
//! detach their command streams; a worker whose stream ends or goes silent is lost.

use std::time::Instant;

use proto::wire::{RegisterRequest, RegisterResponse, Role};

use super::outcome::{refuse, Result};
use super::wire::phase_name;
use super::{JobState, Outgoing};
use crate::journal::Record;
use crate::state::lost::LostReason;
use crate::validate::{self, Code};

impl JobState {
    /// Registers a worker: a new id (journaled) for a request without one, the same
    /// worker again (a restarted process, same role) for one with a known id. Refused
    /// once the job is finished.
    pub fn register(&mut self, req: &RegisterRequest, now: Instant) -> Result<RegisterResponse> {
        validate::register(req)?;
        if self.is_finished() {
            return refuse(
                Code::FailedPrecondition,
                "job_finished",
                format!("the job is {}", phase_name(self.phase)),
            );
        }
        let role = Role::try_from(req.role).unwrap_or(Role::Unspecified);
        let id = if req.worker_id.is_empty() {
            let id = format!("w{}", self.next_worker);
            self.decide(Record::Registered {
                worker_id: id.clone(),
                role: role.as_str_name().to_string(),
                host: req.host.clone(),
            })?;
            id
        } else {
            match self.workers.get(&req.worker_id) {
                None => {
                    return refuse(
                        Code::NotFound,
                        "unknown_worker_id",
                        format!(
                            "worker id {:?} is not known to this job; register without one",
                            req.worker_id
                        ),
                    )
                }
                Some(w) if w.role != role => {
                    return refuse(
                        Code::InvalidArgument,
                        "role_changed",
                        format!(
                            "worker {} registered as {}, not {}",
                            req.worker_id,
                            w.role.as_str_name(),
                            role.as_str_name()
                        ),
                    )
                }
                Some(_) => req.worker_id.clone(),
            }
        };
        if let Some(w) = self.workers.get_mut(&id) {
            w.host = req.host.clone();
            w.devices = req.devices.clone();
            w.ring_address = req.ring_address.clone();
            w.rank_hint = req.rank_hint;
            w.metrics_address = req.metrics_address.clone();
            w.last_seen = now;
        }
        self.event(format!(
            "{id} registered ({} on {})",
            role.as_str_name(),
            req.host
        ));
        Ok(RegisterResponse {
            worker_id: id,
            job_toml: self.cfg.job_toml.clone(),
            job_hash: self.cfg.job_hash.clone(),
            protocol_version: proto::PROTOCOL_VERSION,
            image_count: u64::from(self.cfg.image_count),
        })
    }

    /// Opens a command stream for a registered worker; returns its session number. A
    /// newer stream replaces an older one (`Close` for the old one is the caller's job).
    pub fn attach(&mut self, worker_id: &str, now: Instant) -> Result<u64> {
        let session = self.next_session;
        let Some(w) = self.workers.get_mut(worker_id) else {
            return refuse(
                Code::NotFound,
                "unknown_worker_id",
                format!("worker id {worker_id:?} is not registered"),
            );
        };
        self.next_session += 1;
        w.session = Some(session);
        w.last_seen = now;
        Ok(session)
    }

    /// The stream of `session` ended: the worker is lost (if that is still its stream).
    pub fn detach(&mut self, worker_id: &str, session: u64, now: Instant) -> Result<Vec<Outgoing>> {
        match self.workers.get(worker_id) {
            Some(w) if w.session == Some(session) => {
                self.lose(worker_id, &LostReason::StreamClosed, now)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// A worker is gone: during training its generation is aborted and a new one forms.
    pub(super) fn lose(
        &mut self,
        worker_id: &str,
        reason: &LostReason,
        now: Instant,
    ) -> Result<Vec<Outgoing>> {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.session = None;
        }
        let mut out = vec![Outgoing::Close(worker_id.to_string())];
        if self.member_of_live_world(worker_id).is_none() {
            self.event(format!("{worker_id} detached: {reason}"));
            return Ok(out);
        }
        out.extend(self.leave_generation(worker_id, reason, now)?);
        Ok(out)
    }
}
