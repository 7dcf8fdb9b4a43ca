//! How many images the job trains on: with `data.shard_size` it fixes the shards and
//! with the batch size the steps, so the coordinator must count what the workers index.

use proto::dataset::coco::{self, CocoError};
use proto::job::{DataSource, DataSpec};

#[derive(Debug, thiserror::Error)]
pub enum CountError {
    #[error(transparent)]
    Coco(#[from] CocoError),
    #[error("the dataset has no usable image")]
    Empty,
    #[error("{0} images do not fit a sample index")]
    TooMany(usize),
}

/// Images of the dataset index: `data.synthetic_images` for synthetic data (generated
/// without defects), else the usable images of the COCO annotations.
pub fn image_count(data: &DataSpec) -> Result<u32, CountError> {
    let count = match data.source {
        DataSource::Synthetic => data.synthetic_images,
        DataSource::Coco => {
            let (index, paths) = coco::open_index(data)?;
            tracing::info!(
                "dataset {}: {} images indexed of {} entries ({} skipped: {})",
                paths.annotations.display(),
                index.images.len(),
                index.entries,
                index.counts.total(),
                index.counts
            );
            index.images.len()
        }
    };
    match u32::try_from(count) {
        Ok(0) => Err(CountError::Empty),
        Ok(n) => Ok(n),
        Err(_) => Err(CountError::TooMany(count)),
    }
}
