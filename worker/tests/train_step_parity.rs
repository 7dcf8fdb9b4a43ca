//! The DeCLIP training step against a plain PyTorch reference (tools/reference/
//! make_train_fixture.py): tiny EVA student + crop teacher, tiny DINOv2, two real
//! photos, a fixed crop plan of 11 crops; both losses, the gradient of every
//! trainable tensor, and the weights after 3 AdamW steps under the schedule.

mod common;

use common::{assert_close, fixture_path, relative_error, Fixture};
use tch::Tensor;
use worker::train::trainer::{GlobalCounts, Trainer};

fn trainer() -> Trainer {
    Trainer::new(&common::tiny_job(224, 196), tch::Device::Cpu, 6).expect("trainer")
}

#[test]
fn three_adamw_steps_match_the_pytorch_reference() {
    let fx = Fixture::open("train_step");
    let mut trainer = trainer();
    let batch = common::train_step_batch(&fx);
    let counts = GlobalCounts {
        crops: 11,
        rows: 2 * 196,
    };
    assert_eq!(trainer.optimizer.params.len(), 52, "52 trainable tensors");
    let trainable: i64 = trainer
        .optimizer
        .params
        .iter()
        .map(|p| p.param.numel() as i64)
        .sum();
    assert_eq!(trainable, fx.config["trainable"]["count"].as_i64().unwrap());

    let targets = trainer.online_targets(&batch).unwrap();
    assert_close(
        "crop_embeddings",
        &targets.crop_embeddings,
        &fx.get("step0.crop_embeddings"),
        1e-5,
    );

    // Step 0, by parts: losses and gradients before the update.
    trainer.optimizer.zero_grad();
    let (content, context) = trainer.accumulate(&batch, &targets, counts).unwrap();
    let expect = |key: &str| fx.get(key).double_value(&[]);
    for (what, got, want) in [
        ("loss_content", content, expect("step0.loss_content")),
        ("loss_context", context, expect("step0.loss_context")),
        (
            "loss_total",
            content + 0.1 * context,
            expect("step0.loss_total"),
        ),
    ] {
        assert!(
            ((got - want) / want).abs() <= 1e-5,
            "{what}: {got} vs {want}"
        );
    }
    let mut worst = (0.0, String::new());
    for p in &trainer.optimizer.params {
        let err = relative_error(&p.param.grad(), &fx.get(&format!("grad.{}", p.name)));
        if err > worst.0 {
            worst = (err, p.name.clone());
        }
    }
    eprintln!("worst gradient error {:.2e} ({})", worst.0, worst.1);
    assert!(
        worst.0 <= 1e-5,
        "gradient of {} differs by {:.2e}",
        worst.1,
        worst.0
    );
    let lr0 = trainer.schedule.lr(0);
    trainer.optimizer.step(lr0);

    // Steps 1 and 2 through the public step.
    let lrs: Vec<f64> = Vec::try_from(&fx.get("lr")).unwrap();
    assert_eq!(lr0, lrs[0]);
    let micro = vec![(batch, targets)];
    let losses: Vec<f32> = Vec::try_from(&fx.get("loss_total.steps")).unwrap();
    for step in 1..3u64 {
        let report = trainer.train_step(step, &micro, counts, None).unwrap();
        assert_eq!(report.lr, lrs[step as usize]);
        let want = f64::from(losses[step as usize]);
        assert!(
            ((report.total - want) / want).abs() <= 1e-5,
            "step {step} loss {} vs {want}",
            report.total
        );
    }
    let mut worst = (0.0, String::new());
    for p in &trainer.optimizer.params {
        let err = relative_error(&p.param, &fx.get(&format!("after3.{}", p.name)));
        if err > worst.0 {
            worst = (err, p.name.clone());
        }
    }
    eprintln!(
        "worst weight error after 3 steps {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1e-5,
        "weights of {} differ by {:.2e}",
        worst.1,
        worst.0
    );
    // Frozen tensors did not move.
    let frozen = trainer.student_tensors();
    let original: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture_path("reference/eva_tiny.evaclip.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    for name in [
        "pos_embed",
        "head.weight",
        "blocks.2.attn.k_proj.weight",
        "blocks.2.mlp.w1.weight",
    ] {
        let now = &frozen.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(
            now.equal(&original[&format!("visual.{name}")]),
            "{name} is frozen"
        );
    }
}
