//! The models, one file per architecture family, in tch.
//!
//! Parameter names follow each family's original release (EVA-CLIP, open_clip,
//! Meta's DINO/DINOv2 hub) so the structs mirror the checkpoints users hold;
//! `weights` is the only place that knows other layouts (timm).

pub mod decoupled;
pub mod dinov2;
pub mod eva;
pub mod openai_clip;
pub mod tokenizer;
pub mod towers;
pub mod vit;
pub mod weights;

/// A model cannot run on the given input.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("bad model input: {0}")]
    InputShape(String),
}
