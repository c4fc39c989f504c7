//! Produces the numbers of docs/RESULTS_TRAINING.md by calling `altgrad::train::run_train`.
//!
//! `cargo run --release --example train_results -- run key=value ...` runs one configuration
//! (keys are `TrainOptions` fields, `tiny.hidden=64` for the nested size) and prints a summary.
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
        _ => eprintln!("usage: train_results run key=value ..."),
    }
}
