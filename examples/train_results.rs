//! Produces the numbers of docs/RESULTS_TRAINING.md by calling `altgrad::train::run_train`.
//!
//! `cargo run --release --example train_results -- run key=value ...` runs one configuration
//! (keys are `TrainOptions` fields, `tiny.hidden=64` for the nested size) and prints a summary.
use altgrad::attention::mixed::HeadPlan;
use altgrad::attention::PolyOptions;
use altgrad::model::{AttentionPolicy, LlamaWeights, Model};
use altgrad::train::checkpoint::load_checkpoint;
use altgrad::train::data::{Mqar, Rng};
use altgrad::train::loss::accumulate_masked_grads;
use altgrad::train::optim::{AdamW, AdamWConfig};
use altgrad::train::{run_train, TrainOptions};

fn options(kv: &[String]) -> TrainOptions {
    let mut v = serde_json::to_value(TrainOptions::default()).unwrap();
    for a in kv {
        let (k, val) = a.split_once('=').expect("key=value");
        let parsed: serde_json::Value = serde_json::from_str(val).unwrap_or(serde_json::Value::String(val.into()));
        let parsed = if k == "text" { serde_json::json!(val.split(',').collect::<Vec<_>>()) } else { parsed };
        let mut cur = &mut v;
        let parts: Vec<&str> = k.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            cur = cur.get_mut(*p).expect("known key");
        }
        let last = parts[parts.len() - 1];
        assert!(cur.get(last).is_some(), "unknown option {k}");
        cur[last] = parsed;
    }
    serde_json::from_value(v).expect("valid options")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => {
            let o = options(&args[1..]);
            let s = run_train(&o, std::env::var("PROGRESS").is_ok()).unwrap();
            let tail = s.losses.len().min(10);
            let last = s.losses[s.losses.len() - tail..].iter().sum::<f64>() / tail as f64;
            println!(
                "{} | steps {} | loss first {:.3} last-{tail} {:.3} | val {:.3} | acc {} | {:.3} s/step | {:.0} tok/s",
                s.attention,
                s.last_step,
                s.losses[0],
                last,
                s.val_loss.unwrap_or(f64::NAN),
                s.accuracy.map(|a| format!("{a:.3}")).unwrap_or("-".into()),
                s.mean_step_s,
                s.tokens_per_s
            );
        }
        Some("gradcheck") => {
            // gradcheck CKPT_DIR|init key=value...: relative error of poly/altgrad gradients
            // against exact on 16 MQAR sequences, at the given checkpoint's weights or at init.
            let o = options(&args[2..]);
            let cfg = o.tiny.config(o.vocab.unwrap_or(256)).unwrap();
            let mut model = Model::new(cfg.clone(), LlamaWeights::<f32>::random_hf(&cfg, o.seed), "tiny").unwrap();
            if args[1] != "init" {
                let ck = load_checkpoint(std::path::Path::new(&args[1])).unwrap();
                let mut opt =
                    AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.9, eps: 1.0, weight_decay: 0.0 }, &model.weights);
                ck.restore(&mut model.weights, &mut opt).unwrap();
            }
            let task = Mqar::new(o.vocab.unwrap(), o.seq_len, o.mqar_pairs.unwrap()).unwrap();
            let grad = |plan: HeadPlan| {
                let pol = AttentionPolicy::Fixed(plan);
                let mut g = model.zero_grads(o.seq_len);
                for i in 0..16 {
                    let s = task.sample(&mut Rng::derive(123, 9, 0, i));
                    let c = model.forward_with(&s.ids, &pol).unwrap();
                    accumulate_masked_grads(&model, &c, &s.positions, &s.targets, 1.0 / 64.0, &mut g).unwrap();
                }
                g.weights.params().iter().flat_map(|p| p.data.iter().map(|&x| x as f64)).collect::<Vec<f64>>()
            };
            let exact = grad(HeadPlan::Exact);
            let ne = exact.iter().map(|x| x * x).sum::<f64>().sqrt();
            for (name, plan) in [
                ("poly g=2", HeadPlan::Poly(PolyOptions::new(2))),
                ("poly g=4", HeadPlan::Poly(PolyOptions::new(4))),
                ("altgrad g=2", HeadPlan::AltGrad(PolyOptions::new(2))),
                ("altgrad g=4", HeadPlan::AltGrad(PolyOptions::new(4))),
            ] {
                let g = grad(plan);
                let diff = g.iter().zip(&exact).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
                let dot: f64 = g.iter().zip(&exact).map(|(a, b)| a * b).sum();
                let ng = g.iter().map(|x| x * x).sum::<f64>().sqrt();
                println!("{name}: rel err {:.3e}, cosine {:.4}", diff / ne, dot / (ng * ne));
            }
        }
        _ => eprintln!("usage: train_results run key=value ..."),
    }
}
