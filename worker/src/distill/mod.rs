//! Distillation: RoIAlign over the content map, the losses, the training step.

pub mod losses;
pub mod roi_align;
pub mod step;
