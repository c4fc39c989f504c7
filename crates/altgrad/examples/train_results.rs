//! Produces the training numbers of docs/RESULTS.md by calling `altgrad::train::run_train`.
//!
//! - `run key=value ...`: one configuration (keys are `TrainOptions` fields, `tiny.hidden=64` for
//!   the nested size, `text=A,B` for several files); prints a one-line summary.
//! - `gradcheck CKPT_DIR|init key=value ...`: relative error and cosine of poly/altgrad gradients
//!   against exact on 16 MQAR sequences at a checkpoint's weights (or at initialization).
//!
//! Loss curves of several runs: `altgrad train-plot --out STEM RUN.jsonl ...`.
//! - `timing [key=value ...]`: seconds per update of exact, poly and altgrad at n = 256…2048.
use altgrad::attention::HeadPlan;
use altgrad::attention::PolyOptions;
use altgrad::model::{AttentionPolicy, LlamaWeights, Model, Network};
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
            let show = std::env::var("PROGRESS").is_ok();
            let s = run_train(&o, &|p| {
                if show {
                    eprint!("\r{}/{} {}", p.done, p.total, p.message)
                }
            })
            .unwrap();
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
            let cmp = |a: &[f64], b: &[f64]| {
                let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
                let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
                let diff = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                (diff / nb, dot / (na * nb))
            };
            let exact = grad(HeadPlan::Exact);
            for g in [2, 4] {
                let poly = grad(HeadPlan::Poly(PolyOptions::new(g)));
                let alt = grad(HeadPlan::AltGrad(PolyOptions::new(g)));
                let (pe, pc) = cmp(&poly, &exact);
                let (ae, ac) = cmp(&alt, &exact);
                let (ap, apc) = cmp(&alt, &poly);
                println!(
                    "g={g}: poly vs exact: rel err {pe:.3}, cosine {pc:.3} | altgrad vs exact: {ae:.3}, {ac:.3} | altgrad vs poly (the gradient of its own forward): {ap:.3}, {apc:.3}"
                );
            }
        }
        Some("timing") => {
            // timing: seconds per update (batch 1, 4 updates, best of 2 interleaved rounds) of
            // exact, poly g=2 and altgrad g=2 at n = 256…2048 on the head_dim-16 tiny.
            let kv: Vec<String> = ["task=mqar", "tiny.layers=2", "tiny.hidden=64", "tiny.heads=4", "tiny.kv_heads=2"]
                .iter()
                .map(|s| s.to_string())
                .chain(args[1..].iter().cloned())
                .collect();
            let base = options(&kv);
            println!("| n | exact s/update | poly g=2 | altgrad g=2 | exact / poly |");
            println!("|---|---|---|---|---|");
            for n in [256usize, 512, 1024, 2048] {
                let mut best = [f64::INFINITY; 3];
                for _ in 0..2 {
                    for (i, (att, g)) in [("exact", 2), ("poly", 2), ("altgrad", 2)].into_iter().enumerate() {
                        let o = TrainOptions {
                            attention: att.parse().unwrap(),
                            degree: g,
                            seq_len: n,
                            batch_size: 1,
                            steps: 4,
                            eval_every: 0,
                            eval_seqs: 1,
                            ..base.clone()
                        };
                        best[i] = best[i].min(run_train(&o, &|_| {}).unwrap().mean_step_s);
                    }
                }
                println!("| {n} | {:.4} | {:.4} | {:.4} | {:.2} |", best[0], best[1], best[2], best[0] / best[1]);
            }
        }
        _ => eprintln!("usage: train_results run key=value ..."),
    }
}
