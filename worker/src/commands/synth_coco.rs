//! `worker synth-coco`: a synthetic COCO dataset on disk (or only its annotations, for the
//! index benchmark).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use worker::data::synth_coco::{self, Defect, SynthOptions};

/// Writes the dataset and says what was written.
pub fn synth_coco(
    out: &Path,
    images: u32,
    seed: u64,
    defects: bool,
    index_only: bool,
) -> anyhow::Result<String> {
    let started = Instant::now();
    if index_only {
        let path = out.join(synth_coco::ANNOTATIONS);
        let bytes = synth_coco::write_index_only(&path, images, seed)
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(format!(
            "wrote {} ({images} image entries, {:.1} MB, no image files) in {:.1} s",
            path.display(),
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        ));
    }
    let report = synth_coco::write_dataset(
        out,
        &SynthOptions {
            images,
            seed,
            defects,
        },
    )
    .with_context(|| format!("writing a synthetic COCO dataset under {}", out.display()))?;
    let mut said = format!(
        "wrote {} images under {} and {} ({} entries, {:.1} kB) in {:.1} s",
        report.images,
        report.images_dir.display(),
        report.annotations.display(),
        report.entries,
        report.json_bytes as f64 / 1e3,
        started.elapsed().as_secs_f64()
    );
    if defects {
        said.push_str("\ndefects (file_name: reason a reader gives):");
        for d in Defect::ALL {
            said.push_str(&format!("\n  {}: {}", d.file_name(), d.reason()));
        }
    }
    Ok(said)
}
