//! [`CacheStore`]: the cache of one job as a trainer sees it: which shards a batch needs,
//! whether they are usable yet, and the checked targets of a micro-batch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::plan::order::Shards;
use tch::{Device, Tensor};

use super::error::CacheError;
use super::reader::ShardReader;
use crate::data::sample::CacheRef;
use crate::distill::step::Targets;

/// The cache of one job as a trainer sees it: shard files under `dir` with one
/// fingerprint, opened on first use and kept open.
pub struct CacheStore {
    dir: PathBuf,
    fingerprint: String,
    shards: Shards,
    open: Mutex<HashMap<u32, Arc<ShardReader>>>,
}

impl CacheStore {
    /// The store of `dir` for teachers of `fingerprint` over `shards`. Opens nothing yet.
    pub fn open(dir: &Path, fingerprint: &str, shards: Shards) -> Self {
        Self {
            dir: dir.to_path_buf(),
            fingerprint: fingerprint.to_string(),
            shards,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The folder of the shard files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shards holding `indices` (index positions), ascending, each once: what a
    /// global batch needs before its step can run.
    pub fn shards_needed(&self, indices: &[u32]) -> Result<Vec<u32>, CacheError> {
        let mut out = Vec::new();
        for &index in indices {
            let shard = self.shard_of(index)?;
            if !out.contains(&shard) {
                out.push(shard);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn shard_of(&self, index: u32) -> Result<u32, CacheError> {
        self.shards.shard_of(index).ok_or(CacheError::OutOfRange {
            index,
            images: self.shards.num_images(),
        })
    }

    /// Of `indices`, how many have a usable shard file now and how many do not
    /// (`(hits, misses)`: the cache's hit count when a step needs them).
    pub fn hits_and_misses(&self, indices: &[u32]) -> Result<(u64, u64), CacheError> {
        let needed = self.shards_needed(indices)?;
        let unusable = self.unusable(&needed);
        let mut misses = 0;
        for &index in indices {
            if unusable.contains(&self.shard_of(index)?) {
                misses += 1;
            }
        }
        Ok((indices.len() as u64 - misses, misses))
    }

    /// Of `shards`, those without a usable file (missing, stale or unreadable header).
    pub fn unusable(&self, shards: &[u32]) -> Vec<u32> {
        shards
            .iter()
            .copied()
            .filter(|&s| self.reader(s).is_err())
            .collect()
    }

    /// Waits until every shard of `shards` has a usable file, checking every `poll`, at
    /// most `limit`; then names the ones still missing.
    pub fn wait_for(
        &self,
        shards: &[u32],
        limit: Duration,
        poll: Duration,
    ) -> Result<(), CacheError> {
        let started = Instant::now();
        loop {
            let missing = self.unusable(shards);
            if missing.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= limit {
                return Err(CacheError::Timeout {
                    shards: missing,
                    waited: started.elapsed(),
                });
            }
            tracing::info!("waiting for teacher cache shards {missing:?}");
            std::thread::sleep(poll);
        }
    }

    /// Forgets the open file of `shard`, so the next read opens the file now in place
    /// (after a teacher recomputed it).
    pub fn reopen(&self, shard: u32) {
        self.lock().remove(&shard);
    }

    /// Forgets the open file of `shard` if another file has replaced it since it was
    /// opened (a recomputation this trainer did not ask for); true when it did. A bad
    /// record read from a replaced file says nothing about the file now in place.
    pub fn reopen_if_replaced(&self, shard: u32) -> bool {
        let mut open = self.lock();
        let replaced = open.get(&shard).is_some_and(|r| !r.is_current());
        if replaced {
            open.remove(&shard);
        }
        replaced
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<ShardReader>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reader of `shard`, opening it on first use.
    pub fn reader(&self, shard: u32) -> Result<Arc<ShardReader>, CacheError> {
        if let Some(r) = self.lock().get(&shard) {
            return Ok(r.clone());
        }
        // The store lives on the trainer's thread; the Arc only lets a reader outlive a
        // `reopen` of its shard, it is never sent to another thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let reader = Arc::new(ShardReader::open(&self.dir, shard, &self.fingerprint)?);
        self.lock().insert(shard, reader.clone());
        Ok(reader)
    }

    /// The record of one sample, checked against it: same image, same bytes, same crop
    /// boxes for its epoch. Returns features `[C,gh,gw]` and embeddings `[K,E]`.
    pub fn sample_targets(&self, r: &CacheRef) -> Result<(Tensor, Tensor), CacheError> {
        let shard = self.shard_of(r.index)?;
        let reader = self.reader(shard)?;
        let (entry, mut record) = reader.record(r.index)?;
        let mismatch = |detail: String| CacheError::NoRecord {
            shard,
            file: reader.file.clone(),
            index: r.index,
            image_id: r.image_id,
            detail,
        };
        if entry.image_id != r.image_id || entry.key != r.key.hex() {
            return Err(mismatch(format!(
                "the record is image {} with key {}, the trainer read image {} with key {} \
                 (the dataset changed since the teacher ran: recompute the shard)",
                entry.image_id, entry.key, r.image_id, r.key
            )));
        }
        let epochs = record.epochs.len();
        let (boxes, emb) = record
            .epochs
            .get_mut(r.epoch as usize)
            .ok_or_else(|| mismatch(format!("epoch {} not cached (0..{epochs})", r.epoch)))?;
        if *boxes != r.boxes {
            return Err(CacheError::Corrupt {
                shard,
                file: reader.file.clone(),
                image_id: r.image_id,
                detail: format!(
                    "epoch {} crop boxes differ from the crop plan ({} stored, {} planned)",
                    r.epoch,
                    boxes.len(),
                    r.boxes.len()
                ),
            });
        }
        Ok((record.vfm_features, std::mem::replace(emb, Tensor::new())))
    }

    /// The targets of a micro-batch (records in batch order) on `device`: crop
    /// embeddings `[K,E]` in RoI order, VFM features `[B,C,gh,gw]`.
    pub fn targets(&self, refs: &[CacheRef], device: Device) -> Result<Targets, CacheError> {
        let mut features = Vec::with_capacity(refs.len());
        let mut crops = Vec::with_capacity(refs.len());
        for r in refs {
            let (f, e) = self.sample_targets(r)?;
            features.push(f);
            crops.push(e);
        }
        Ok(Targets {
            crop_embeddings: Tensor::cat(&crops, 0).to_device(device),
            vfm_features: Tensor::stack(&features, 0).to_device(device),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::teacher::cache::test_shards::{
        bits, write_shard, Layout, Source, CHANNELS, EMBED, FINGERPRINT, GRID_H, GRID_W,
    };
    use crate::teacher::compress::Storage;
    use proto::cache::shard_path;

    /// 14 images in shards of 4: shards 0..3, the last one of 2 images.
    fn shards() -> Shards {
        Shards::new(14, 4).unwrap()
    }

    fn write(dir: &Path, shard: u32) -> Vec<Source> {
        let range = shards().range(shard).unwrap();
        write_shard(dir, shard, range, &Layout::default()).1
    }

    #[test]
    fn shards_needed_lists_each_shard_once_ascending() {
        let store = CacheStore::open(Path::new("/nonexistent"), FINGERPRINT, shards());
        assert_eq!(
            store.shards_needed(&[13, 0, 5, 1, 12, 4]).unwrap(),
            [0, 1, 3]
        );
        assert_eq!(store.shards_needed(&[]).unwrap(), [] as [u32; 0]);
        assert!(matches!(
            store.shards_needed(&[3, 14]),
            Err(CacheError::OutOfRange {
                index: 14,
                images: 14
            })
        ));
    }

    /// Missing, stale and unreadable files are unusable; a shard becomes usable once a good
    /// file appears (a failed open is not remembered).
    #[test]
    fn unusable_and_hits_and_misses_count_every_kind_of_bad_shard() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0);
        let stale = Layout {
            fingerprint: "teachers-b",
            ..Layout::default()
        };
        write_shard(dir.path(), 1, 4..8, &stale);
        fs::write(shard_path(dir.path(), 2), b"not a shard").unwrap();
        let store = CacheStore::open(dir.path(), FINGERPRINT, shards());
        assert_eq!(store.unusable(&[0, 1, 2, 3]), [1, 2, 3]);
        assert_eq!(store.unusable(&[]), [] as [u32; 0]);
        // Indices 0, 3 (shard 0) hit; 4 (stale), 9 (unreadable), 12, 13 (missing) miss.
        assert_eq!(
            store.hits_and_misses(&[0, 4, 9, 12, 3, 13]).unwrap(),
            (2, 4)
        );
        assert!(matches!(
            store.hits_and_misses(&[0, 99]),
            Err(CacheError::OutOfRange { index: 99, .. })
        ));

        write(dir.path(), 3);
        assert_eq!(store.unusable(&[0, 1, 2, 3]), [1, 2]);
        assert_eq!(store.hits_and_misses(&[12, 13]).unwrap(), (2, 0));
    }

    #[test]
    fn wait_for_returns_once_every_shard_is_usable_and_names_the_missing_on_timeout() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0);
        let store = CacheStore::open(dir.path(), FINGERPRINT, shards());
        store
            .wait_for(&[0], Duration::ZERO, Duration::from_millis(1))
            .unwrap();
        match store.wait_for(&[0, 2, 3], Duration::ZERO, Duration::from_millis(1)) {
            Err(CacheError::Timeout { shards, .. }) => assert_eq!(shards, [2, 3]),
            other => panic!("expected a timeout, got {other:?}"),
        }

        // A shard written while it waits ends the wait.
        let path = dir.path().to_path_buf();
        let teacher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            write(&path, 2);
        });
        // 600 s only catches a hang: the shard appears after 50 ms plus one tiny write.
        store
            .wait_for(&[0, 2], Duration::from_secs(600), Duration::from_millis(5))
            .unwrap();
        teacher.join().unwrap();
    }

    #[test]
    fn a_shard_stays_open_until_reopen_or_a_replacement() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0);
        let store = CacheStore::open(dir.path(), FINGERPRINT, shards());
        assert_eq!(store.dir(), dir.path());
        assert!(!store.reopen_if_replaced(0), "nothing open yet");
        let first = store.reader(0).unwrap();
        assert!(Arc::ptr_eq(&first, &store.reader(0).unwrap()), "kept open");
        assert!(!store.reopen_if_replaced(0), "the file is still in place");
        assert!(Arc::ptr_eq(&first, &store.reader(0).unwrap()));

        store.reopen(0);
        let second = store.reader(0).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "reopened");

        // A teacher renames a recomputed file (here: fp16) over it.
        let fp16 = Layout {
            storage: Storage::Fp16,
            ..Layout::default()
        };
        write_shard(dir.path(), 0, 0..4, &fp16);
        assert_eq!(store.reader(0).unwrap().header.vfm_storage, Storage::Fp32);
        assert!(store.reopen_if_replaced(0));
        assert!(!store.reopen_if_replaced(0), "forgotten already");
        assert_eq!(store.reader(0).unwrap().header.vfm_storage, Storage::Fp16);
        // A file that is gone counts as replaced too.
        fs::remove_file(shard_path(dir.path(), 0)).unwrap();
        assert!(store.reopen_if_replaced(0));
        assert!(matches!(
            store.reader(0),
            Err(CacheError::Missing { shard: 0, .. })
        ));
    }

    #[test]
    fn sample_targets_are_the_record_of_that_image_epoch_and_boxes() {
        let dir = tempfile::tempdir().unwrap();
        let sources = write(dir.path(), 1);
        let store = CacheStore::open(dir.path(), FINGERPRINT, shards());
        let s = &sources[2];
        for epoch in 0..2 {
            let (features, emb) = store.sample_targets(&s.cache_ref(epoch)).unwrap();
            assert_eq!(bits(&features), bits(&s.features));
            assert_eq!(bits(&emb), bits(&s.epochs[epoch as usize].1));
        }

        let no_record = |r: CacheRef, wanted: &str| match store.sample_targets(&r) {
            Err(CacheError::NoRecord {
                shard: 1,
                index: 6,
                image_id,
                detail,
                ..
            }) => {
                assert_eq!(image_id, r.image_id);
                assert!(detail.contains(wanted), "{detail}");
            }
            other => panic!("expected NoRecord, got {other:?}"),
        };
        let mut other_image = s.cache_ref(0);
        other_image.image_id += 1;
        no_record(other_image, "the dataset changed since the teacher ran");
        let mut other_bytes = s.cache_ref(0);
        other_bytes.key = proto::cache::ContentKey::of_file_bytes(b"edited");
        no_record(other_bytes, "the dataset changed since the teacher ran");
        let mut later = s.cache_ref(0);
        later.epoch = 2;
        no_record(later, "epoch 2 not cached (0..2)");

        let mut moved = s.cache_ref(1);
        moved.boxes[0].x1 += 1.0;
        let err = store.sample_targets(&moved).unwrap_err();
        assert!(
            matches!(&err, CacheError::Corrupt { shard: 1, image_id, detail, .. }
                if *image_id == s.image_id && detail.contains("crop boxes differ from the crop plan")),
            "{err:?}"
        );
        let mut outside = s.cache_ref(0);
        outside.index = 14;
        assert!(matches!(
            store.sample_targets(&outside),
            Err(CacheError::OutOfRange { index: 14, .. })
        ));
    }

    #[test]
    fn targets_stack_features_and_concatenate_embeddings_in_batch_order() {
        let dir = tempfile::tempdir().unwrap();
        let first = write(dir.path(), 0);
        let last = write(dir.path(), 3);
        let store = CacheStore::open(dir.path(), FINGERPRINT, shards());
        let batch = [(&last[1], 0), (&first[0], 1), (&first[3], 0)];
        let refs: Vec<CacheRef> = batch.iter().map(|(s, e)| s.cache_ref(*e)).collect();
        let targets = store.targets(&refs, Device::Cpu).unwrap();
        let features: Vec<Tensor> = batch
            .iter()
            .map(|(s, _)| s.features.shallow_clone())
            .collect();
        let crops: Vec<Tensor> = batch
            .iter()
            .map(|(s, e)| s.epochs[*e as usize].1.shallow_clone())
            .collect();
        assert_eq!(
            targets.vfm_features.size(),
            [3, CHANNELS as i64, GRID_H as i64, GRID_W as i64]
        );
        assert_eq!(
            bits(&targets.vfm_features),
            bits(&Tensor::stack(&features, 0))
        );
        let k: i64 = crops.iter().map(|c| c.size()[0]).sum();
        assert_eq!(targets.crop_embeddings.size(), [k, EMBED as i64]);
        assert_eq!(
            bits(&targets.crop_embeddings),
            bits(&Tensor::cat(&crops, 0))
        );
        // One bad sample fails the batch.
        let mut refs = refs;
        refs[1].image_id += 1;
        assert!(store.targets(&refs, Device::Cpu).is_err());
    }
}
