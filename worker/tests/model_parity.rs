//! The models against the real reference implementations (fixtures from
//! tools/reference: timm's EVA02 and DINOv2, open_clip's CLIP, and the method
//! spec's decoupled block written plainly in PyTorch), fp32, relative error ≤ 1e-5,
//! at native and non-native grids with letterboxed (non-square) photos.

mod common;

use common::{assert_close, fixture_path, Fixture};
use proto::job::arch::Family;
use proto::job::{DecoupledMode, WeightsLayout};
use tch::{nn, Device, Tensor};
use worker::model::decoupled::{encode_dense, DecoupledConfig, DecoupledTower};
use worker::model::dinov2::DinoVit;
use worker::model::eva::EvaVision;
use worker::model::openai_clip::{ClipText, ClipVision, TextConfig};
use worker::model::weights::{self, Tower};

/// Forward passes only, fp32, on the reference's weights and inputs: ours and PyTorch's
/// differ in summation order alone (GEMM blocking picked by the CPU's vector width,
/// softmax and LayerNorm reductions). A reassociated reduction of K terms errs by ≈ √K·u
/// (u = 2^-24; worst case K·u) of its scale: K ≤ 256 here (the longest dot products:
/// 197–401 tokens in attention, 192 hidden units), so ≈ 1e-6 per layer, adding up over
/// the ≤ 3 blocks and heads of the tiny fixtures to a few 1e-6. Measured: ≤ 1.5e-6 on an
/// Intel Xeon with AVX-512, ≤ 1.2e-6 on an AMD EPYC with AVX2 (docs/numeric-bounds.md).
/// A wrong operation (a missed scale, a RoPE angle, another interpolation) errs by ≥ 1e-3.
const TOL: f64 = 1e-5;

fn eva_from(file: &str, layout: WeightsLayout, io: &Fixture) -> (nn::VarStore, EvaVision) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = EvaVision::new(&vs.root(), &io.arch(Family::Eva02));
    let report = weights::load(&mut vs, &fixture_path(file), Tower::EvaVision, layout)
        .expect("load EVA weights");
    if file.contains("evaclip") {
        assert!(
            report.ignored > 0,
            "EVA-CLIP's stored RoPE tables are ignored, not loaded"
        );
    }
    (vs, model)
}

#[test]
fn eva02_tower_and_decoupled_block_match_the_reference_at_224_320_560() {
    let io = Fixture::open("eva_tiny.io");
    let (_vs, eva) = eva_from(
        "reference/eva_tiny.evaclip.safetensors",
        WeightsLayout::Auto,
        &io,
    );
    let modes = [
        ("qq", DecoupledMode::Qq, false),
        ("qq_scaled", DecoupledMode::Qq, true),
        ("kk", DecoupledMode::Kk, false),
        ("csa", DecoupledMode::Csa, false),
    ];
    tch::no_grad(|| {
        for res in [224, 320, 560] {
            let images = io.input(res);
            if res != 560 {
                let (tokens, _) = eva.tokens_before_last(&images).unwrap();
                assert_close(
                    &format!("{res} tokens_before_last"),
                    &tokens,
                    &io.get(&format!("{res}.tokens_before_last")),
                    TOL,
                );
            }
            let embedding = eva.image_embedding(&images).unwrap();
            assert_close(
                &format!("{res} image_embedding"),
                &embedding,
                &io.get(&format!("{res}.image_embedding")),
                TOL,
            );
            for (name, mode, scale) in modes {
                if res == 560 && name != "qq" {
                    continue; // the 560 fixture keeps qq only (size)
                }
                let dense = encode_dense(&eva, DecoupledConfig { mode, scale }, &images).unwrap();
                let map_key = format!("{res}.content_map.{name}");
                assert_close(&map_key, &dense.content_map, &io.get(&map_key), TOL);
                if name != "qq_scaled" {
                    let ctx_key = format!("{res}.context.{name}");
                    assert_close(&ctx_key, &dense.context, &io.get(&ctx_key), TOL);
                }
            }
        }
    });
}

#[test]
fn eva02_weights_in_timm_layout_give_the_same_model() {
    let io = Fixture::open("eva_tiny.io");
    let (_a, from_evaclip) = eva_from(
        "reference/eva_tiny.evaclip.safetensors",
        WeightsLayout::Evaclip,
        &io,
    );
    let (_b, from_timm) = eva_from(
        "reference/eva_tiny.timm.safetensors",
        WeightsLayout::Auto,
        &io,
    );
    tch::no_grad(|| {
        let images = io.input(320);
        let a = from_evaclip.image_embedding(&images).unwrap();
        let b = from_timm.image_embedding(&images).unwrap();
        assert_eq!(a.size(), b.size());
        assert!(
            a.equal(&b),
            "same weights through two layouts must give identical outputs"
        );
    });
}

fn dinov2_from(file: &str, io: &Fixture, family: Family) -> (nn::VarStore, DinoVit) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = DinoVit::new(&vs.root(), &io.arch(family));
    weights::load(
        &mut vs,
        &fixture_path(file),
        Tower::DinoVit,
        WeightsLayout::Auto,
    )
    .expect("load DINO weights");
    (vs, model)
}

#[test]
fn dinov2_patch_features_match_timm_at_280_490_and_native_518() {
    let io = Fixture::open("dinov2_tiny.io");
    for file in [
        "reference/dinov2_tiny.meta.safetensors",
        "reference/dinov2_tiny.timm.safetensors",
    ] {
        let (_vs, dino) = dinov2_from(file, &io, Family::Dinov2);
        tch::no_grad(|| {
            for res in [280, 490, 518] {
                let features = dino.patch_features(&io.input(res)).unwrap();
                let key = format!("{res}.patch_features");
                assert_close(&format!("{file} {key}"), &features, &io.get(&key), TOL);
            }
        });
    }
}

#[test]
fn dino_v1_patch_features_match_meta_interpolation_at_224_and_320() {
    let io = Fixture::open("dino_tiny.io");
    let (_vs, dino) = dinov2_from("reference/dino_tiny.meta.safetensors", &io, Family::Dino);
    tch::no_grad(|| {
        for res in [224, 320] {
            let key = format!("{res}.patch_features");
            assert_close(
                &key,
                &dino.patch_features(&io.input(res)).unwrap(),
                &io.get(&key),
                TOL,
            );
        }
    });
}

#[test]
fn openai_clip_image_tower_and_decoupled_block_match_open_clip() {
    let io = Fixture::open("openai_tiny.io");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let clip = ClipVision::new(&vs.root(), &io.arch(Family::OpenaiClip));
    let file = fixture_path("reference/openai_tiny.openclip.safetensors");
    weights::load(&mut vs, &file, Tower::ClipVision, WeightsLayout::Auto)
        .expect("load open_clip vision");
    tch::no_grad(|| {
        for res in [224, 320] {
            let images = io.input(res);
            let (tokens, _) = clip.tokens_before_last(&images).unwrap();
            assert_close(
                &format!("{res} tokens_before_last"),
                &tokens,
                &io.get(&format!("{res}.tokens_before_last")),
                TOL,
            );
            let key = format!("{res}.image_embedding");
            assert_close(
                &key,
                &clip.image_embedding(&images).unwrap(),
                &io.get(&key),
                TOL,
            );
            let dense = encode_dense(&clip, DecoupledConfig::default(), &images).unwrap();
            let key = format!("{res}.content_map.qq");
            assert_close(&key, &dense.content_map, &io.get(&key), TOL);
            let key = format!("{res}.context.qq");
            assert_close(&key, &dense.context, &io.get(&key), TOL);
        }
    });
}

#[test]
fn clip_text_tower_matches_open_clip_encode_text() {
    let io = Fixture::open("openai_tiny.io");
    let cfg = &io.config;
    let text_cfg = TextConfig {
        width: cfg["text_width"].as_u64().unwrap() as usize,
        layers: cfg["text_layers"].as_u64().unwrap() as usize,
        heads: cfg["text_heads"].as_u64().unwrap() as usize,
        mlp_hidden: cfg["text_mlp_hidden"].as_u64().unwrap() as usize,
        context_length: 77,
        vocab_size: 49408,
        embed_dim: cfg["embed_dim"].as_u64().unwrap() as usize,
        layer_norm_eps: cfg["eps"].as_f64().unwrap(),
    };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let text = ClipText::new(&vs.root(), &text_cfg);
    let file = fixture_path("reference/openai_tiny.openclip.safetensors");
    weights::load(&mut vs, &file, Tower::ClipText, WeightsLayout::Auto)
        .expect("load open_clip text");
    let ids = io.get("text.ids");
    // The ids are the tokenizer's job (tokenizer_parity.rs); here the tower alone.
    let embedding = tch::no_grad(|| text.text_embedding(&ids));
    assert_close("text.embedding", &embedding, &io.get("text.embedding"), TOL);
}

#[test]
fn a_mismatched_weights_file_lists_every_problem_at_once() {
    worker::runtime::init();
    let io = Fixture::open("eva_tiny.io");
    let dir = tempfile::tempdir().unwrap();
    // Drop one tensor, add an unknown one, and reshape a third.
    let mut tensors: Vec<(String, Tensor)> =
        Tensor::read_safetensors(fixture_path("reference/eva_tiny.evaclip.safetensors")).unwrap();
    tensors.retain(|(name, _)| name != "visual.blocks.1.attn.q_bias");
    tensors.push((
        "visual.blocks.9.attn.q_bias".into(),
        Tensor::zeros([64], (tch::Kind::Float, Device::Cpu)),
    ));
    for (name, t) in tensors.iter_mut() {
        if name == "visual.head.weight" {
            *t = Tensor::zeros([16, 64], (tch::Kind::Float, Device::Cpu));
        }
    }
    let path = dir.path().join("broken.safetensors");
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _eva = EvaVision::new(&vs.root(), &io.arch(Family::Eva02));
    let err = weights::load(&mut vs, &path, Tower::EvaVision, WeightsLayout::Auto)
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.safetensors"), "{err}");
    assert!(
        err.contains("missing    blocks.1.attn.q_bias [64]"),
        "{err}"
    );
    assert!(
        err.contains("unexpected visual.blocks.9.attn.q_bias [64]"),
        "{err}"
    );
    assert!(
        err.contains("mis-shaped head.weight: model [32, 64], file [16, 64]"),
        "{err}"
    );

    // A truncated file and a file of another format are refused, naming the file.
    let bytes = std::fs::read(fixture_path("reference/eva_tiny.evaclip.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err =
        weights::load(&mut vs, &truncated, Tower::EvaVision, WeightsLayout::Auto).unwrap_err();
    assert!(
        err.to_string().contains("truncated.safetensors")
            && err.to_string().contains("not a valid safetensors"),
        "{err}"
    );
    let pickle = dir.path().join("model.pt");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let err = weights::load(&mut vs, &pickle, Tower::EvaVision, WeightsLayout::Auto).unwrap_err();
    assert!(err.to_string().contains("model.pt"), "{err}");
}

#[test]
fn wrong_input_sizes_are_errors_not_panics() {
    let io = Fixture::open("eva_tiny.io");
    let (_vs, eva) = eva_from(
        "reference/eva_tiny.evaclip.safetensors",
        WeightsLayout::Auto,
        &io,
    );
    let odd = Tensor::zeros([1, 3, 230, 224], (tch::Kind::Float, Device::Cpu));
    let err = eva.image_embedding(&odd).unwrap_err();
    assert!(
        err.to_string().contains("multiples of the patch size 16"),
        "{err}"
    );
}
