//! `worker teach --standalone`: writes the job's teacher cache shards in this process,
//! without a coordinator. Shards with a usable file (same fingerprint) are kept.

use std::ops::Range;

use anyhow::Context;
use proto::job::JobSpec;
use tch::Device;
use worker::data::source::ImageSource;
use worker::teacher::job_cache::JobCache;
use worker::teacher::models::TeacherModels;
use worker::teacher::shard::ShardOutcome;

/// Parses `A..B` (shards A to B-1) or `A` (one shard).
pub fn parse_shards(text: &str) -> anyhow::Result<Range<u32>> {
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .with_context(|| format!("--shards {text:?}: expected A..B or A"))
    };
    match text.split_once("..") {
        Some((a, b)) => Ok(number(a)?..number(b)?),
        None => {
            let a = number(text)?;
            Ok(a..a.saturating_add(1))
        }
    }
}

/// Computes shards `only` (all when `None`) of `spec` on `device`, printing one line
/// per shard: `shard N written|present file checksum bytes images`.
pub fn teach_standalone(
    spec: &JobSpec,
    only: Option<Range<u32>>,
    device: Device,
) -> anyhow::Result<()> {
    let source = worker::data::job_source::job_source(spec).context("opening the dataset")?;
    let cache = JobCache::of(spec, source.image_count()).context("planning shards")?;
    let shards = cache.shards;
    let wanted = only.unwrap_or(0..shards.len());
    anyhow::ensure!(
        wanted.end <= shards.len(),
        "--shards {}..{}: the dataset has {} shards (0..{})",
        wanted.start,
        wanted.end,
        shards.len(),
        shards.len()
    );
    let models = TeacherModels::new(spec, device).context("building the teachers")?;
    let dir = &cache.dir;
    tracing::info!(
        "teacher fingerprint {}; writing shards {}..{} of {} into {}",
        models.fingerprint(),
        wanted.start,
        wanted.end,
        shards.len(),
        dir.display()
    );
    for shard in wanted {
        let outcome = cache
            .ensure(spec, &models, &source, shard)
            .with_context(|| format!("shard {shard}"))?;
        match outcome {
            ShardOutcome::Present { shard } => println!(
                "shard {shard} present {}",
                proto::cache::shard_path(dir, shard).display()
            ),
            ShardOutcome::Written(w) => println!(
                "shard {shard} written {} sha256 {} bytes {} images {}",
                w.file.display(),
                w.checksum,
                w.bytes,
                w.images
            ),
        }
    }
    Ok(())
}
