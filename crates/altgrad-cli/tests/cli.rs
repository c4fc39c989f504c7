//! The command line as a user meets it: outputs, JSON keys, exit codes, and error messages.

mod common;
use common::{altgrad, fixture, stderr, stdout, tmpdir};
use std::path::Path;

#[test]
fn default_run_prints_a_summary() {
    let o = altgrad(&["grad", "--seq-len", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for key in ["loss", "forward", "backward", "tokens/s"] {
        assert!(out.contains(key), "missing {key} in:\n{out}");
    }
}

#[test]
fn grad_json_and_outputs_follow_the_contract() {
    let d = tmpdir("json");
    let (out, hid, json) = (d.join("g.safetensors"), d.join("h.safetensors"), d.join("r.json"));
    let o = altgrad(&[
        "grad",
        "--model",
        &fixture("llama_tiny"),
        "--tokens",
        &fixture("llama_tiny/tokens.txt"),
        "--dtype",
        "f64",
        "--out",
        out.to_str().unwrap(),
        "--hidden-out",
        hid.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for k in ["model", "seq_len", "n_layers", "attention", "loss", "heads", "timing_s", "compare"] {
        assert!(v.get(k).is_some(), "json lacks {k}: {v}");
    }
    assert_eq!(v["seq_len"], 24);
    assert_eq!(v["heads"].as_array().unwrap().len(), 2 * 4);
    for k in ["layer", "head", "method", "bound", "degree", "rank", "predicted_rel_err"] {
        assert!(v["heads"][0].get(k).is_some(), "head lacks {k}");
    }
    for k in ["forward", "backward", "exact_backward"] {
        assert!(v["timing_s"].get(k).is_some(), "timing_s lacks {k}");
    }
    // the loss and gradients written equal the transformers reference
    let exp = altgrad::io::read_safetensors(Path::new(&fixture("llama_tiny/expected.safetensors"))).unwrap();
    let get = |ts: &[altgrad::io::TensorF64], n: &str| ts.iter().find(|t| t.name == n).unwrap().clone();
    let want_loss = get(&exp, "loss").data[0];
    assert!((v["loss"].as_f64().unwrap() - want_loss).abs() < 1e-9);
    let grads = altgrad::io::read_safetensors(&out).unwrap();
    assert_eq!(grads.len(), exp.iter().filter(|t| t.name.starts_with("grad.")).count() + 1);
    for g in &grads {
        let want = if g.name == "embeddings_grad" {
            get(&exp, "embeddings_grad")
        } else {
            get(&exp, &format!("grad.{}", g.name))
        };
        assert_eq!(g.shape, want.shape, "{}", g.name);
        assert_eq!(g.dtype, "F64");
        let err: f64 = g.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-9, "{}: max abs err {err}", g.name);
    }
    let h = altgrad::io::read_safetensors(&hid).unwrap();
    assert_eq!(h[0].name, "hidden");
    assert_eq!(h[0].shape, vec![24, 32]);
}

#[test]
fn json_to_stdout_is_pure_json() {
    let o = altgrad(&["grad", "--seq-len", "16", "--json", "-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["seq_len"], 16);
}

#[test]
fn attn_exact_matches_pytorch_through_the_cli() {
    let d = tmpdir("attn");
    let out = d.join("o.safetensors");
    let o = altgrad(&[
        "attn",
        "--input",
        &fixture("attention/input.safetensors"),
        "--out",
        out.to_str().unwrap(),
        "--attention",
        "exact",
        "--causal",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = altgrad::io::read_safetensors(&out).unwrap();
    let exp = altgrad::io::read_safetensors(Path::new(&fixture("attention/expected.safetensors"))).unwrap();
    for name in ["o", "dq", "dk", "dv"] {
        let g = got.iter().find(|t| t.name == name).unwrap();
        let w = exp.iter().find(|t| t.name == format!("{name}_causal")).unwrap();
        assert_eq!(g.shape, w.shape);
        assert_eq!(g.dtype, "F64", "output keeps the input dtype");
        let err: f64 = g.data.iter().zip(&w.data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "{name}: {err}");
    }
}

#[test]
fn attn_hybrid_through_the_cli() {
    let d = tmpdir("attn_hybrid");
    let out = d.join("o.safetensors");
    let (inp, o_path) = (fixture("attention/input.safetensors"), out.to_str().unwrap().to_string());
    let run = |extra: &[&str]| {
        let mut args = vec!["attn", "--input", &inp, "--out", &o_path, "--attention", "hybrid"];
        args.extend_from_slice(extra);
        let o = altgrad(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        altgrad::io::read_safetensors(&out).unwrap()
    };
    let get = |ts: &[altgrad::io::TensorF64], n: &str| ts.iter().find(|t| t.name == n).unwrap().clone();
    let maxdiff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    // a window longer than the sequence is exact causal attention: PyTorch's numbers
    let got = run(&["--window", "100000"]);
    let exp = altgrad::io::read_safetensors(Path::new(&fixture("attention/expected.safetensors"))).unwrap();
    for name in ["o", "dq", "dk", "dv"] {
        let err = maxdiff(&get(&got, name).data, &get(&exp, &format!("{name}_causal")).data);
        assert!(err < 1e-12, "{name}: {err}");
    }
    // a short window and a sink: the naive O(n²) form
    let got = run(&["--window", "3", "--sinks", "1", "--degree", "2", "--chunk", "5"]);
    let x = altgrad::io::read_safetensors(Path::new(&inp)).unwrap();
    let (q, k, v) = (get(&x, "q"), get(&x, "k"), get(&x, "v"));
    let [b, n, h, dd] = q.shape[..] else { panic!("q is 4-D") };
    assert_eq!(b, 1, "the fixture holds one sequence");
    let s = altgrad::attention::AttnShape::new(n, h, k.shape[2], dd).with_head_dim_v(v.shape[3]);
    let p = altgrad::attention::naive::Poly::new(true, 1.0 / (dd as f64).sqrt(), 2, true);
    let want = altgrad::attention::naive::hybrid_forward(&q.data, &k.data, &v.data, &s, &p, 3, 1);
    let err = maxdiff(&get(&got, "o").data, &want);
    assert!(err < 1e-12, "hybrid o: {err}");
    assert!(get(&got, "dq").data.iter().all(|x| x.is_finite()));
}

#[test]
fn attn_window_flags_are_checked() {
    let d = tmpdir("attn_window");
    let out = d.join("o.safetensors");
    let (inp, o) = (fixture("attention/input.safetensors"), out.to_str().unwrap().to_string());
    let base = ["attn", "--input", inp.as_str(), "--out", o.as_str()];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().map(|s| s.to_string()).chain(extra.iter().map(|s| s.to_string())).collect()
    };
    for (extra, needle) in [
        (&["--attention", "hybrid"][..], "--window: hybrid attention needs --window"),
        (&["--attention", "hybrid", "--window", "4", "--degree", "3"][..], "--degree"),
        (&["--attention", "poly", "--window", "4"][..], "--window: poly attention takes no window"),
        (&["--window", "0"][..], "--window: must be at least 1"),
        (&["--sinks", "2"][..], "--sinks: sinks belong to a window"),
    ] {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_user_error(&refs, needle);
    }
    assert!(!out.exists(), "nothing written on error");
}

fn assert_user_error(args: &[&str], needle: &str) {
    let o = altgrad(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "args {args:?}: expected exit 2, got {:?}; stderr: {err}", o.status);
    assert!(err.contains(needle), "args {args:?}: stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
}

#[test]
fn bad_input_gives_exit_2_and_names_the_input() {
    let d = tmpdir("bad");
    let toks = d.join("t.txt");
    std::fs::write(&toks, "1 2 99999").unwrap();
    let t = toks.to_str().unwrap();
    assert_user_error(&["grad", "--tokens", t], "token id 99999 at position 2");
    std::fs::write(&toks, "").unwrap();
    assert_user_error(&["grad", "--tokens", t], "t.txt");
    std::fs::write(&toks, "5").unwrap();
    assert_user_error(&["grad", "--tokens", t], "at least 2");
    assert_user_error(&["grad", "--model", "/nonexistent/model"], "/nonexistent/model");
    assert_user_error(&["grad", "--tokens", "/nonexistent/tokens.txt"], "/nonexistent/tokens.txt");
    assert_user_error(&["grad", "--seq-len", "0"], "--seq-len");
    assert_user_error(&["grad", "--threads", "0"], "--threads");
    assert_user_error(&["grad", "--attention", "bogus"], "bogus");
    // broken model directory
    let m = d.join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("config.json"), "{ not json").unwrap();
    assert_user_error(&["grad", "--model", m.to_str().unwrap()], "config.json");
    // attn: missing tensor, NaN, wrong rank
    let inp = d.join("in.safetensors");
    let q = vec![0.5f32; 2 * 3 * 2 * 4];
    altgrad::io::write_safetensors(&inp, &[("q".to_string(), vec![2, 3, 2, 4], q.clone())]).unwrap();
    let out = d.join("out.safetensors");
    assert_user_error(
        &["attn", "--input", inp.to_str().unwrap(), "--out", out.to_str().unwrap()],
        "missing tensor `k`",
    );
    let mut qn = q.clone();
    qn[3] = f32::NAN;
    altgrad::io::write_safetensors(
        &inp,
        &[
            ("q".to_string(), vec![2, 3, 2, 4], qn),
            ("k".to_string(), vec![2, 3, 2, 4], q.clone()),
            ("v".to_string(), vec![2, 3, 2, 4], q.clone()),
        ],
    )
    .unwrap();
    assert_user_error(&["attn", "--input", inp.to_str().unwrap(), "--out", out.to_str().unwrap()], "non-finite");
    assert!(!out.exists(), "nothing written on error");
}

#[test]
fn existing_output_survives_a_failed_run() {
    let d = tmpdir("keep");
    let out = d.join("g.safetensors");
    std::fs::write(&out, b"previous results").unwrap();
    let toks = d.join("t.txt");
    std::fs::write(&toks, "1 2 99999").unwrap();
    let o = altgrad(&["grad", "--tokens", toks.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read(&out).unwrap(), b"previous results");
}

#[test]
fn inspect_writes_table_json_and_heatmap() {
    let d = tmpdir("inspect");
    let stem = d.join("deg");
    let json = d.join("i.json");
    let o = altgrad(&[
        "inspect",
        "--model",
        "tiny-bounded",
        "--seq-len",
        "200",
        "--tol",
        "0.1",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        stem.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let heads = v["heads"].as_array().unwrap();
    assert_eq!(heads.len(), 4 * 4);
    for k in ["layer", "head", "max_abs_score", "bound", "bound_unshifted", "degree", "rank", "method"] {
        assert!(heads[0].get(k).is_some(), "inspect head lacks {k}: {}", heads[0]);
    }
    // the shifted bound bounds every actual shifted score, hence is at least half the max |score|
    // minus the shift; at minimum it is finite and positive here
    assert!(heads.iter().all(|h| h["bound"].as_f64().unwrap() > 0.0));
    for ext in ["png", "svg"] {
        assert!(stem.with_extension(ext).exists(), "heatmap .{ext}");
    }
}

/// Never silently slow (issue 14): a forced degree whose predicted cost is far above exact's is
/// refused before any work, with both predicted costs, exit 2; `--force` runs it.
#[test]
fn forced_slow_degree_is_refused_with_its_cost() {
    let args = ["grad", "--model", "tiny", "--seq-len", "64", "--attention", "poly"];
    let t = std::time::Instant::now();
    let o = altgrad(&args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("--attention") && e.contains("FLOP per layer against") && e.contains("--force"), "{e}");
    assert!(t.elapsed().as_secs() < 20, "refused only after {:?}", t.elapsed());
    let o = altgrad(&["grad", "--model", "tiny", "--seq-len", "64", "--attention", "poly", "--degree", "2", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = altgrad(&["grad", "--model", "tiny", "--max-slowdown", "0", "--attention", "poly"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--max-slowdown"), "{}", stderr(&o));
}

#[test]
fn grad_poly_compare_reports_every_layer() {
    let o = altgrad(&[
        "grad",
        "--model",
        "tiny-bounded",
        "--seq-len",
        "128",
        "--attention",
        "poly",
        "--degree",
        "4",
        "--force",
        "--compare",
        "--json",
        "-",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = &v["compare"];
    for k in ["loss_exact", "speedup", "rel_err_total", "layers"] {
        assert!(c.get(k).is_some(), "compare lacks {k}");
    }
    let layers = c["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    for l in layers {
        let (dx, dw) = (l["rel_err_dx"].as_f64().unwrap(), l["rel_err_dw"].as_f64().unwrap());
        assert!(dx > 0.0 && dx < 0.05 && dw > 0.0 && dw < 0.05, "bounded model, degree 4: {l}");
    }
    assert!(v["heads"].as_array().unwrap().iter().all(|h| h["method"] == "poly" && h["degree"] == 4));
    assert!(v["timing_s"]["exact_backward"].as_f64().is_some());
    assert!(c["speedup"].as_f64().is_some_and(|x| x > 0.0), "poly vs exact has a speed-up: {c}");
}

#[test]
fn grad_compare_of_exact_against_exact_reports_no_speedup() {
    // Both sides exact: the ratio of their times is noise, so none is reported.
    let args = ["grad", "--model", "tiny", "--seq-len", "64", "--attention", "exact", "--compare"];
    let o = altgrad(&[&args[..], &["--json", "-"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["compare"]["speedup"].is_null(), "{}", v["compare"]);
    assert!(v["compare"]["rel_err_total"].as_f64().is_some_and(|e| e < 1e-6));
    let o = altgrad(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("no speed-up to report") && !out.contains("speed-up of the backward"), "{out}");
}

#[test]
fn odd_degree_and_bad_flags_are_rejected() {
    assert_user_error(&["grad", "--attention", "poly", "--degree", "3"], "degree must be even");
    assert_user_error(&["grad", "--attention", "auto", "--degree", "2"], "--degree");
    assert_user_error(&["grad", "--attention", "poly", "--tol=-1"], "--tol");
    assert_user_error(&["grad", "--attention", "poly", "--chunk", "0"], "--chunk");
}

#[test]
fn tokenize_prints_the_models_ids() {
    let d = tmpdir("tok");
    let t = d.join("t.txt");
    std::fs::write(&t, "Hi!").unwrap();
    let o = altgrad(&["tokenize", "--model", "tiny", "--text", t.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "72 105 33");
    let gguf =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.exists() {
        std::fs::write(&t, "The GNU General Public License 3").unwrap();
        let o = altgrad(&["tokenize", "--model", gguf.to_str().unwrap(), "--text", t.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let ids: Vec<u32> = String::from_utf8_lossy(&o.stdout).split_whitespace().map(|x| x.parse().unwrap()).collect();
        // digits are split one by one (smollm pre-tokenizer); no BOS (add_bos_token = false)
        assert!(ids.len() >= 5 && ids[0] != 1, "{ids:?}");
    }
    assert_user_error(&["tokenize", "--model", "tiny", "--text", "/nonexistent.txt"], "/nonexistent.txt");
}

#[test]
fn train_plot_and_train_plot_subcommand_draw_files() {
    let d = tmpdir("trainplot");
    let (log, stem) = (d.join("run.jsonl"), d.join("loss"));
    let o = altgrad(&[
        "train",
        "--task",
        "mqar",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--vocab",
        "32",
        "--seq-len",
        "32",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--json",
        log.to_str().unwrap(),
        "--plot",
        stem.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["loss.png", "loss.svg", "loss-accuracy.png", "loss-accuracy.svg"] {
        assert!(d.join(f).metadata().map(|m| m.len()).unwrap_or(0) > 1000, "{f} missing");
    }
    let cmp = d.join("cmp");
    let o = altgrad(&["train-plot", "--out", cmp.to_str().unwrap(), log.to_str().unwrap(), log.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("cmp.png").metadata().map(|m| m.len()).unwrap_or(0) > 1000);
    // against training time (equal wall-clock budgets)
    let by_time = d.join("cmp-time");
    let o = altgrad(&["train-plot", "--x", "time", "--out", by_time.to_str().unwrap(), log.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = std::fs::read_to_string(d.join("cmp-time.svg")).unwrap();
    assert!(svg.contains("training time (s)"), "the x axis is time");
}

#[test]
fn a_model_built_with_hybrid_attention_trains_and_grad_computes_its_own_attention() {
    let d = tmpdir("hybrid_model");
    let ck = d.join("ck");
    let text_path = d.join("text.txt");
    std::fs::write(&text_path, "the program is free software; you can copy and share it. ".repeat(40)).unwrap();
    let text = text_path.to_str().unwrap().to_string();
    let o = altgrad(&[
        "train",
        "--text",
        &text,
        "--layers",
        "2",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--seq-len",
        "24",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--attention",
        "hybrid",
        "--window",
        "4",
        "--sinks",
        "1",
        "--feature-dim",
        "8",
        "--checkpoint",
        ck.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hybrid w=4 s=1 d_f=8 g=2"));
    let o = altgrad(&["grad", "--model", ck.to_str().unwrap(), "--text", &text, "--compare", "--json", "-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["attention"], "built-in");
    assert!(v["heads"].as_array().unwrap().iter().all(|h| h["method"] == "hybrid"));
    assert!(v["compare"]["speedup"].is_null(), "the same function on both sides: no speed-up");
    assert_eq!(v["compare"]["rel_err_total"], 0.0);
    // an HF Llama cannot compute it: export refuses
    assert_user_error(&["export", ck.to_str().unwrap(), "--out", d.join("hf").to_str().unwrap()], "its own attention");
}

#[test]
fn grad_profile_times_every_layer_kind_within_the_pass() {
    let o = altgrad(&["grad", "--model", "tiny", "--seq-len", "128", "--profile"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let secs = |label: &str| -> f64 {
        let line = out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label}: {out}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (fwd, bwd) = (secs("forward"), secs("backward"));
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| !l.starts_with("profile"))
        .skip(2)
        .take(12)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // "  kind…  forward  backward  total  share%": the timed kinds (not the derived untimed rest)
    let col = |r: &Vec<&str>, from_end: usize| -> f64 { r[r.len() - from_end].parse().unwrap() };
    let (timed, untimed) = rows.split_at(11);
    assert_eq!(untimed[0][0], "other", "{out}");
    let (sf, sb) = timed.iter().fold((0.0, 0.0), |(f, b), r| (f + col(r, 4), b + col(r, 3)));
    for k in ["embedding", "norms", "q/k/v projections", "RoPE", "attention", "o projection", "gate/up projections"] {
        assert!(out.contains(&format!("  {k} ")), "missing {k}: {out}");
    }
    // no kind is counted twice (the timed kinds fit in each pass), and the timers cover the
    // pass: what no kind covers is a small rest
    let tol = 0.0005 * 11.0 + 0.001;
    assert!(sf <= fwd + tol && sb <= bwd + tol, "timed {sf}/{sb} vs passes {fwd}/{bwd}: {out}");
    assert!(col(&untimed[0], 2) < 0.2 * (fwd + bwd) + tol, "untimed rest too large: {out}");
    let attention = timed.iter().find(|r| r[0] == "attention").expect("attention row");
    assert!(col(attention, 2) > 0.0, "{out}");
    let o = altgrad(&["grad", "--model", "tiny", "--profile", "--compare"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
