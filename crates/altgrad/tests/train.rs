//! `altgrad train` as a library call: loss falls, resumption is bit-identical, bad options and
//! data give clear errors, interrupted checkpoint writes leave the previous checkpoint intact, and
//! the masked (MQAR) loss gradient matches finite differences.

mod common;
use altgrad::attention::HeadPlan;
use altgrad::attention::Method;
use altgrad::attention::PolyOptions;
use altgrad::model::{AttentionPolicy, LlamaConfig, LlamaWeights, Model, Network, RopeLayout};
use altgrad::train::checkpoint::{load_checkpoint, prev_dir, save_checkpoint_interrupted, TrainState};
use altgrad::train::loss::{accumulate_masked_grads, masked_lm_loss};
use altgrad::train::optim::{AdamW, AdamWConfig};
use altgrad::train::{run_charts, run_train, Task, TinySize, TrainOptions};
use altgrad::Error;
use std::path::{Path, PathBuf};

use common::TempDir;

/// Repetitive English-like text: easy to learn a little of in a few dozen updates.
fn write_text(dir: &Path) -> PathBuf {
    let words = ["the", "program", "is", "free", "software", "you", "can", "copy", "and", "share", "it"];
    let mut s = String::new();
    for i in 0..900 {
        s.push_str(words[(i * 7 + i / 3) % words.len()]);
        s.push(if i % 9 == 8 { '.' } else { ' ' });
    }
    let p = dir.join("text.txt");
    std::fs::write(&p, s).unwrap();
    p
}

fn small() -> TrainOptions {
    TrainOptions {
        tiny: TinySize { layers: 2, hidden: 32, heads: 2, kv_heads: 1 },
        steps: 40,
        batch_size: 4,
        seq_len: 48,
        lr: 3e-3,
        eval_every: 20,
        eval_seqs: 4,
        ..TrainOptions::default()
    }
}

fn bad_input(e: Error) -> (String, String) {
    match e {
        Error::BadInput { input, msg } => (input, msg),
        other => panic!("expected BadInput, got {other:?}"),
    }
}

#[test]
fn loss_falls_on_text_and_mqar() {
    let d = TempDir::new("falls");
    let text = write_text(&d.0);
    let o = TrainOptions { text: vec![text], ..small() };
    let s = run_train(&o, &|_| {}).unwrap();
    let first = s.losses[0];
    let last: f64 = s.losses[35..].iter().sum::<f64>() / 5.0;
    eprintln!("text: first {first:.3}, last-5 mean {last:.3}, val {:?}", s.val_loss);
    assert_eq!(s.losses.len(), 40);
    assert!(first > 4.0 && last < first - 1.5, "byte loss should fall from ~ln 256: {first} → {last}");
    assert!(s.val_loss.unwrap() < first - 1.0);

    let o = TrainOptions { task: Some(Task::Mqar), vocab: Some(32), mqar_pairs: Some(4), seq_len: 32, ..small() };
    let s = run_train(&o, &|_| {}).unwrap();
    let first = s.losses[0];
    let last: f64 = s.losses[35..].iter().sum::<f64>() / 5.0;
    eprintln!("mqar: first {first:.3}, last-5 mean {last:.3}, acc {:?}", s.accuracy);
    assert!(last < first - 0.5, "answers come from 16 values, not 32 tokens: {first} → {last}");
    let acc = s.accuracy.unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(s.records.iter().all(|r| r.train_accuracy.is_some()));
}

#[test]
fn resume_is_bit_identical_and_survives_interrupted_writes() {
    let d = TempDir::new("resume");
    let base = TrainOptions {
        task: Some(Task::Mqar),
        vocab: Some(32),
        mqar_pairs: Some(4),
        seq_len: 40,
        steps: 12,
        batch_size: 2,
        eval_every: 5,
        attention: Method::Poly,
        chunk: 16,
        ..small()
    };
    // Uninterrupted reference.
    let full = run_train(
        &TrainOptions { checkpoint: Some(d.0.join("a")), json: Some(d.0.join("a.jsonl")), ..base.clone() },
        &|_| {},
    )
    .unwrap();
    assert_eq!(full.losses.len(), 12);

    // Stopped after update 6, as an interruption would.
    let ck = d.0.join("b");
    let opts_b = TrainOptions { checkpoint: Some(ck.clone()), json: Some(d.0.join("b.jsonl")), ..base.clone() };
    let part = run_train(&TrainOptions { stop_at: Some(6), ..opts_b.clone() }, &|_| {}).unwrap();
    assert!(part.stopped_early);
    assert_eq!(part.losses.len(), 6);
    let before = load_checkpoint(&ck).unwrap();
    assert_eq!(before.state.step, 6);

    // A save that dies after 1, 2 or 3 of its 4 files leaves the checkpoint as it was.
    let cfg = LlamaConfig { vocab_size: 32, ..base.tiny.config(32).unwrap() };
    let junk_w = LlamaWeights::<f32>::random_hf(&cfg, 99);
    let junk_o = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.9, eps: 1.0, weight_decay: 0.0 }, &junk_w);
    let junk_s = TrainState { step: 999, ..before.state.clone() };
    for files in 1..=3 {
        assert!(save_checkpoint_interrupted(&ck, &junk_w, &junk_o, &junk_s, &before.config, files).is_err());
        let now = load_checkpoint(&ck).unwrap();
        assert_eq!(now.state, before.state);
        assert_eq!(now.weights, before.weights);
    }
    // A stale temporary directory from another (crashed) process, with a partial file.
    let stale = ck.with_file_name("b.tmp-4000000");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("weights.safetensors"), b"\x10\x00\x00").unwrap();
    // A crash between the two renames: only `<dir>.prev` remains.
    std::fs::rename(&ck, prev_dir(&ck).unwrap()).unwrap();
    assert_eq!(load_checkpoint(&ck).unwrap().state.step, 6);

    // Resuming must not accept changed options.
    let e = run_train(&TrainOptions { resume: true, lr: 2e-3, ..opts_b.clone() }, &|_| {}).unwrap_err();
    let (input, msg) = bad_input(e);
    assert!(input.contains("b.prev") && msg.contains("lr"), "{input}: {msg}");

    let rest = run_train(&TrainOptions { resume: true, ..opts_b.clone() }, &|_| {}).unwrap();
    assert_eq!(rest.first_step, 7);
    let joined: Vec<u64> = part.losses.iter().chain(&rest.losses).map(|x| x.to_bits()).collect();
    let reference: Vec<u64> = full.losses.iter().map(|x| x.to_bits()).collect();
    assert_eq!(joined, reference, "stop at 6 + resume must reproduce the uninterrupted losses bit for bit");
    assert_eq!(rest.val_loss.unwrap().to_bits(), full.val_loss.unwrap().to_bits());
    assert_eq!(rest.accuracy, full.accuracy);
    let wa = std::fs::read(d.0.join("a/weights.safetensors")).unwrap();
    let wb = std::fs::read(ck.join("weights.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
    let oa = std::fs::read(d.0.join("a/optimizer.safetensors")).unwrap();
    let ob = std::fs::read(ck.join("optimizer.safetensors")).unwrap();
    assert!(oa == ob, "final optimizer states differ");
    assert!(!prev_dir(&ck).unwrap().exists());

    // The resumed log has each update once, with the same losses.
    let log = std::fs::read_to_string(d.0.join("b.jsonl")).unwrap();
    let steps: Vec<u64> =
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>());
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    for k in ["step", "loss", "lr", "tokens_per_s", "grad_norm", "train_accuracy"] {
        assert!(first.get(k).is_some(), "missing {k}");
    }
    let fifth: serde_json::Value = serde_json::from_str(log.lines().nth(4).unwrap()).unwrap();
    assert!(fifth["val_loss"].is_f64() && fifth["accuracy"].is_f64());

    // A finished run cannot be started again into the same directory without --resume.
    let (input, msg) = bad_input(run_train(&opts_b, &|_| {}).unwrap_err());
    assert!(input.ends_with('b') && msg.contains("--resume"), "{input}: {msg}");

    // Charts comparing the two runs (drawn by the CLI: tests/cli.rs).
    let stem = d.0.join("curves");
    let charts = run_charts(&[d.0.join("a.jsonl"), d.0.join("b.jsonl")], &stem).unwrap();
    assert_eq!(charts.len(), 2, "loss and accuracy charts");
    assert!(charts[1].stem.ends_with("curves-accuracy"));
    for c in &charts {
        assert!(c.series.iter().filter(|s| !s.points.is_empty()).count() >= 2, "{}", c.stem);
    }
    let (input, _) = bad_input(run_charts(&[d.0.join("nope.jsonl")], &stem).unwrap_err());
    assert!(input.ends_with("nope.jsonl"));
}

#[test]
fn bad_options_and_data_name_the_input() {
    let d = TempDir::new("bad");
    let text = write_text(&d.0);
    let ok = TrainOptions { text: vec![text.clone()], ..small() };
    let cases: Vec<(TrainOptions, &str, &str)> = vec![
        (TrainOptions { steps: 0, ..ok.clone() }, "--steps", "at least 1"),
        (TrainOptions { batch_size: 0, ..ok.clone() }, "--batch-size", "at least 1"),
        (TrainOptions { seq_len: 1, ..ok.clone() }, "--seq-len", "at least 2"),
        (TrainOptions { lr: f64::NAN, ..ok.clone() }, "--lr", "positive"),
        (TrainOptions { attention: Method::Poly, degree: 3, ..ok.clone() }, "--degree", "even"),
        (TrainOptions { text: vec![], ..ok.clone() }, "--text/--task", "give training data"),
        (TrainOptions { task: Some(Task::Mqar), ..ok.clone() }, "--text/--task", "not both"),
        (TrainOptions { stop_at: Some(3), ..ok.clone() }, "--stop-at", "--checkpoint"),
        (TrainOptions { resume: true, ..ok.clone() }, "--resume", "--checkpoint"),
        (TrainOptions { warmup: Some(41), ..ok.clone() }, "--warmup", "exceeds"),
        (TrainOptions { tiny: TinySize { hidden: 33, ..small().tiny }, ..ok.clone() }, "--hidden", "multiple"),
        (TrainOptions { tiny: TinySize { hidden: 30, ..small().tiny }, ..ok.clone() }, "--hidden", "even"),
        (TrainOptions { tiny: TinySize { layers: 0, ..small().tiny }, ..ok.clone() }, "--layers", "positive"),
        (TrainOptions { vocab: Some(300), ..ok.clone() }, "--vocab", "256"),
        (
            TrainOptions { text: vec![], task: Some(Task::Mqar), mqar_pairs: Some(20), ..ok.clone() },
            "--mqar-pairs",
            "at least 80",
        ),
        (TrainOptions { model: d.0.join("no-model").display().to_string(), ..ok.clone() }, "no-model", "no such"),
        (TrainOptions { text: vec![d.0.join("missing.txt")], ..ok.clone() }, "missing.txt", "cannot read"),
        (TrainOptions { seq_len: 20000, ..ok.clone() }, "text.txt", "fewer than --seq-len 20000"),
        (
            TrainOptions { resume: true, checkpoint: Some(d.0.join("nothing")), ..ok.clone() },
            "nothing",
            "no checkpoint",
        ),
    ];
    for (o, input, needle) in cases {
        let (i, m) = bad_input(run_train(&o, &|_| {}).unwrap_err());
        assert!(i.contains(input) && m.contains(needle), "expected `{input}` / `{needle}`, got `{i}: {m}`");
    }
    std::fs::write(d.0.join("empty.txt"), b"").unwrap();
    let (i, m) =
        bad_input(run_train(&TrainOptions { text: vec![d.0.join("empty.txt")], ..ok.clone() }, &|_| {}).unwrap_err());
    assert!(i.ends_with("empty.txt") && m.contains("empty"), "{i}: {m}");
    // A directory that is not a checkpoint is never replaced.
    let other = d.0.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), b"x").unwrap();
    let (i, _) = bad_input(run_train(&TrainOptions { checkpoint: Some(other.clone()), ..ok }, &|_| {}).unwrap_err());
    assert!(i.ends_with("other") && other.join("keep.txt").exists());
    assert!("sgd".parse::<Method>().is_err() && "altgrad".parse::<Method>().is_ok());
}

fn fd_cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_layout: RopeLayout::RotateHalf,
        max_seq_len: 64,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        built_in_attention: None,
    }
}

#[test]
fn masked_loss_gradient_matches_finite_differences() {
    let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3];
    let positions = [2usize, 5, 6, 9];
    let targets = [7u32, 0, 10, 4];
    let scale = 0.37;
    for tied in [false, true] {
        let cfg = LlamaConfig { tie_word_embeddings: tied, ..fd_cfg() };
        let mut w = LlamaWeights::<f64>::random_hf(&cfg, 5);
        for p in w.params_mut() {
            if !p.name.ends_with("norm.weight") {
                p.data.iter_mut().for_each(|x| *x *= 2.0);
            }
        }
        let model = Model::new(cfg, w, "fd").unwrap();
        let plans = [HeadPlan::Exact, HeadPlan::Poly(PolyOptions { degree: 2, center: true, chunk: 3 })];
        for plan in plans {
            let policy = AttentionPolicy::Fixed(plan);
            let loss = |m: &Model<f64>| {
                let c = m.forward_with(&ids, &policy).unwrap();
                scale * masked_lm_loss(m, &c, &positions, &targets, scale, None).unwrap().sum_nll
            };
            let cache = model.forward_with(&ids, &policy).unwrap();
            let mut grads = model.zero_grads(ids.len());
            let (sum, correct) =
                accumulate_masked_grads(&model, &cache, &positions, &targets, scale, &mut grads).unwrap();
            assert!((scale * sum - loss(&model)).abs() < 1e-14 && correct <= 4);
            let fds = common::fd_params(&model, 1e-5, loss);
            for (gp, fd) in grads.weights.params().iter().zip(&fds) {
                let num: f64 = gp.data.iter().zip(fd).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
                let den: f64 = fd.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-12);
                let e = num / den;
                assert!(e < 1e-7, "tied={tied} {} {}: rel err {e:e}", plan.method_name(), gp.name);
            }
            // Unscored rows get no gradient from the loss itself.
            let ml = masked_lm_loss(&model, &cache, &positions, &targets, scale, Some(&mut vec![0.0; 88])).unwrap();
            for r in [0usize, 1, 3, 4, 7, 8] {
                assert!(ml.dhidden[r * 8..(r + 1) * 8].iter().all(|&v| v == 0.0));
            }
        }
    }
}

/// A checkpoint directory loads as a model (`job::load_model`, what `altgrad grad --model DIR` and
/// the Python `altgrad.load(DIR)` use): the saved weights under their names, bytes as tokens, and
/// the same loss as the trained weights give.
#[test]
fn checkpoint_loads_as_a_model() {
    let d = TempDir::new("load");
    let text = write_text(&d.0);
    let ck = d.0.join("ck");
    let o = TrainOptions { text: vec![text], steps: 3, checkpoint: Some(ck.clone()), ..small() };
    run_train(&o, &|_| {}).unwrap();
    let saved = load_checkpoint(&ck).unwrap();
    let loaded = altgrad::job::load_model::<f32>(ck.to_str().unwrap(), 0).unwrap();
    let altgrad::io::AnyModel::Llama(m) = &loaded.model else { panic!("a checkpoint holds a Llama model") };
    assert_eq!((m.cfg.num_layers, m.cfg.hidden_size, m.cfg.num_kv_heads), (2, 32, 1));
    for p in m.weights.params() {
        let t = saved.weights.iter().find(|t| t.name == p.name).unwrap_or_else(|| panic!("{} not saved", p.name));
        assert!(t.data.iter().zip(&p.data).all(|(a, b)| *a as f32 == *b), "{} differs", p.name);
    }
    assert_eq!(loaded.encode("ab").unwrap(), vec![97, 98]);
    let ids: Vec<u32> = "the program is free".bytes().map(u32::from).collect();
    let r = altgrad::job::grad_run(&loaded, &ids, "ids", &AttentionPolicy::EXACT, "exact", false, &|_| {}).unwrap();
    assert_eq!(r.report.model, ck.display().to_string());
    assert!(r.report.loss.is_finite() && r.report.n_layers == 2);
    // a directory that is not a checkpoint is still an HF-directory error
    let Err(e) = altgrad::job::load_model::<f32>(d.0.to_str().unwrap(), 0) else { panic!("not a model") };
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn built_in_hybrid_and_poly_models_train_resume_and_load() {
    // a tiny decoder built with hybrid layers (window 8, one sink) and a poly layer, q/k projected
    // to feature_dim 8: the loss falls, stop + resume reproduces the uninterrupted run bit for bit,
    // and the checkpoint loads as a model with the same attention (its loss is the run's).
    let d = TempDir::new("builtin");
    let text = write_text(&d.0);
    let base = TrainOptions {
        text: vec![text],
        attention: Method::Hybrid,
        layer_attention: Some(vec!["hybrid".parse().unwrap(), "poly".parse().unwrap()]),
        feature_dim: Some(8),
        window: Some(8),
        sinks: 1,
        chunk: 16,
        ..small()
    };
    let full = run_train(&TrainOptions { checkpoint: Some(d.0.join("a")), ..base.clone() }, &|_| {}).unwrap();
    let (first, last) = (full.losses[0], full.losses[35..].iter().sum::<f64>() / 5.0);
    assert!(first > 4.0 && last < first - 1.0, "byte loss should fall: {first} → {last}");
    let b = full.config.built_in_attention.as_ref().expect("built with its attention");
    assert_eq!((b.feature_dim, b.window, b.sinks), (8, 8, 1));
    let opts_b = TrainOptions { checkpoint: Some(d.0.join("b")), ..base.clone() };
    let part = run_train(&TrainOptions { stop_at: Some(15), ..opts_b.clone() }, &|_| {}).unwrap();
    let rest = run_train(&TrainOptions { resume: true, ..opts_b }, &|_| {}).unwrap();
    let joined: Vec<u64> = part.losses.iter().chain(&rest.losses).map(|x| x.to_bits()).collect();
    assert_eq!(joined, full.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    // the checkpoint as a model: the same config, q_proj of feature_dim per head in layer 0
    let loaded = altgrad::io::load_model::<f32>(d.0.join("a").to_str().unwrap(), 0).unwrap();
    let altgrad::io::AnyModel::Llama(m) = loaded.model else { panic!("a decoder") };
    assert_eq!(m.cfg.built_in_attention, full.config.built_in_attention);
    assert_eq!(m.weights.layers[0].q_proj.weight.shape, vec![2 * 8, 32]);
    // built-in options need a model created with them, and hybrid a window
    let e = run_train(&TrainOptions { window: None, ..base.clone() }, &|_| {}).unwrap_err();
    assert_eq!(bad_input(e).0, "--window");
    let e = run_train(&TrainOptions { model: d.0.join("a").display().to_string(), ..base }, &|_| {}).unwrap_err();
    assert_eq!(bad_input(e).0, "--attention");
}
