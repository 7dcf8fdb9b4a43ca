//! [`Normalization`]: letterboxed `u8` pixels to the model's normalised `f32` input.

/// Per-channel mean and std applied as `(u8 / 255 − mean) / std`, in f32, in that order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalization {
    /// Per-channel mean (R, G, B), subtracted after the division by 255.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (R, G, B), divided by last.
    pub std: [f32; 3],
}

impl Normalization {
    /// CLIP (OpenAI, open_clip, EVA-CLIP): student and crop-teacher inputs.
    pub const CLIP: Self = Self::from_f64(
        [0.48145466, 0.4578275, 0.40821073],
        [0.26862954, 0.26130258, 0.27577711],
    );
    /// ImageNet (DINOv2, DINO): the VFM input.
    pub const IMAGENET: Self = Self::from_f64([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

    /// From the published (decimal, f64) constants, rounded to f32 once, as
    /// `torch.tensor(mean, dtype=torch.float32)` does.
    pub const fn from_f64(mean: [f64; 3], std: [f64; 3]) -> Self {
        Self {
            mean: [mean[0] as f32, mean[1] as f32, mean[2] as f32],
            std: [std[0] as f32, std[1] as f32, std[2] as f32],
        }
    }

    /// Normalises CHW pixels (3 planes of equal size) into f32, exactly as the reference does in
    /// PyTorch on CPU: `x = u8 as f32 / 255; (x − mean[c]) / std[c]`, each op rounded to f32.
    ///
    /// Each (channel, value) pair has one result, so it is computed once into a table and
    /// looked up: bit-identical to computing it per pixel, and several times faster (the
    /// data loader's hot path; `bench/loader.sh`). A length that is not a multiple of 3
    /// puts the extra values in the last channel.
    pub fn apply_chw(&self, chw: &[u8]) -> Vec<f32> {
        let tables = self.tables();
        let plane = chw.len() / 3;
        if plane == 0 {
            return chw
                .iter()
                .enumerate()
                .map(|(i, &v)| tables[i.min(2)][usize::from(v)])
                .collect();
        }
        let mut out = Vec::with_capacity(chw.len());
        let (first, rest) = chw.split_at(plane);
        let (second, third) = rest.split_at(plane);
        for (values, table) in [first, second, third].into_iter().zip(&tables) {
            out.extend(values.iter().map(|&v| table[usize::from(v)]));
        }
        out
    }

    /// `tables[c][v]` = `(v / 255 − mean[c]) / std[c]`, each op rounded to f32.
    fn tables(&self) -> [[f32; 256]; 3] {
        let mut tables = [[0.0f32; 256]; 3];
        for (c, table) in tables.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (f32::from(v as u8) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_is_u8_over_255_minus_mean_over_std_in_f32() {
        let norm = Normalization::CLIP;
        let chw = [0u8, 255, 128, 0, 255, 128];
        let out = norm.apply_chw(&chw);
        for (i, &v) in chw.iter().enumerate() {
            let c = i / 2;
            let x = f32::from(v) / 255.0;
            assert_eq!(
                out[i].to_bits(),
                ((x - norm.mean[c]) / norm.std[c]).to_bits()
            );
        }
        assert_eq!(
            Normalization::IMAGENET.mean,
            [0.485f64 as f32, 0.456f64 as f32, 0.406f64 as f32]
        );
        assert_eq!(Normalization::CLIP.std[2], 0.27577711f64 as f32);
    }

    /// The lookup tables give, value for value, the per-pixel formula (every u8, every
    /// channel, both constant sets), and odd lengths keep their channel assignment.
    #[test]
    fn normalisation_tables_match_the_formula_bit_for_bit() {
        for norm in [Normalization::CLIP, Normalization::IMAGENET] {
            for len in [0usize, 1, 2, 3 * 256, 3 * 256 + 2] {
                let chw: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
                let plane = len / 3;
                let out = norm.apply_chw(&chw);
                assert_eq!(out.len(), len);
                for (i, &v) in chw.iter().enumerate() {
                    let c = (i / plane.max(1)).min(2);
                    let want = (f32::from(v) / 255.0 - norm.mean[c]) / norm.std[c];
                    assert_eq!(out[i].to_bits(), want.to_bits(), "len {len} index {i}");
                }
            }
        }
    }
}
