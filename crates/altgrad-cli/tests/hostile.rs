//! Issue 15 through the binary: signals during writes and training, outputs checked before the
//! work, non-finite results, checkpoints as models, and what a new user met.

mod common;
use common::{altgrad, bin, fixture, stderr, stdout, tmpdir};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Runs `args`, expects exit code 2 and every needle in stderr, never a panic or a Rust debug
/// dump; returns stderr.
fn user_error(args: &[&str], needles: &[&str]) -> String {
    let o = altgrad(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: expected exit 2, got {:?}; stderr: {err}", o.status);
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks {n:?}: {err}");
    }
    for bad in ["panicked", "Os {", "IoError(", "ImageError"] {
        assert!(!err.contains(bad), "{args:?}: {bad} in {err}");
    }
    err
}

fn tmp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

fn kill(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill failed");
}

fn wait_for(what: &str, timeout_s: f64, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed().as_secs_f64() < timeout_s, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_signal_during_grad_out_removes_the_temporary_file_and_keeps_the_old_one() {
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let d = tmpdir(&format!("sig{sig}"));
        let out = d.join("g.safetensors");
        std::fs::write(&out, b"previous gradients").unwrap();
        let child = bin()
            .args(["grad", "--seq-len", "32", "--out", out.to_str().unwrap()])
            .env("ALTGRAD_TEST_WRITE_DELAY_MS", "20000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the temporary file", 60.0, || !tmp_files(&d).is_empty());
        kill(&child, sig);
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
        assert!(tmp_files(&d).is_empty(), "left behind: {:?}", tmp_files(&d));
        assert_eq!(std::fs::read(&out).unwrap(), b"previous gradients", "the previous file is intact");
        let err = stderr(&o);
        assert!(err.contains("interrupted") && err.contains(".tmp-"), "{err}");
    }
}

#[test]
fn a_signal_during_train_leaves_a_checkpoint_that_resumes() {
    let d = tmpdir("train-sig");
    let (ck, log) = (d.join("ck"), d.join("log.jsonl"));
    let args = |steps: &str| -> Vec<String> {
        [
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
            "64",
            "--batch-size",
            "4",
            "--eval-every",
            "0",
            "--eval-seqs",
            "2",
            "--steps",
            steps,
            "--checkpoint",
            ck.to_str().unwrap(),
            "--json",
            log.to_str().unwrap(),
            "--threads",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let child = bin().args(args("100000")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let lines = || std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0);
    wait_for("three updates", 120.0, || lines() >= 3);
    kill(&child, libc::SIGTERM);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    let done = lines();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"].as_u64().unwrap() as usize, done, "checkpoint at the last completed update");
    assert!(tmp_files(&d).is_empty(), "{:?}", tmp_files(&d));
    // The checkpoint is a model.
    let toks = d.join("t.txt");
    std::fs::write(&toks, "1 2 3 4 5 6 7 8").unwrap();
    let o = altgrad(&["grad", "--model", ck.to_str().unwrap(), "--tokens", toks.to_str().unwrap(), "--json", "-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Resume continues after it (with the same options).
    let mut resume = args("100000");
    resume.push("--resume".into());
    let child = bin().args(resume).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a resumed update", 120.0, || lines() > done);
    kill(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("updates      {}..", done + 1)), "{out}");
    let log_text = std::fs::read_to_string(&log).unwrap();
    let steps: Vec<u64> = log_text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>(), "one record per update, in order");
}

#[test]
fn resuming_a_finished_run_says_so() {
    let d = tmpdir("finished");
    let ck = d.join("ck");
    let a = [
        "train",
        "--task",
        "mqar",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--vocab",
        "16",
        "--seq-len",
        "16",
        "--batch-size",
        "1",
        "--steps",
        "2",
        "--checkpoint",
        ck.to_str().unwrap(),
    ];
    assert!(altgrad(&a).status.success());
    let mut r = a.to_vec();
    r.push("--resume");
    let o = altgrad(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(err.contains("already finished") && err.contains("update 2 of 2"), "{err}");
    assert!(!out.contains("NaN") && !out.contains("3..2"), "{out}");
}

#[test]
fn outputs_are_checked_before_the_work() {
    let d = tmpdir("outputs");
    let file = d.join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("x");
    let t = Instant::now();
    let train = [
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
        "100000",
    ];
    let with = |extra: &[&str]| -> Vec<String> { train.iter().chain(extra).map(|s| s.to_string()).collect() };
    let run = |v: Vec<String>, needles: &[&str]| {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        user_error(&refs, needles);
    };
    run(with(&["--plot", "/nonexistent/p"]), &["--plot /nonexistent/p.png", "directory /nonexistent does not exist"]);
    run(with(&["--json", "/nonexistent/l.jsonl"]), &["--json /nonexistent/l.jsonl"]);
    run(with(&["--checkpoint", under_file.to_str().unwrap()]), &["--checkpoint", "is not a directory"]);
    assert!(t.elapsed().as_secs_f64() < 20.0, "the 100000 updates never started");
    for flag in ["--out", "--hidden-out", "--json"] {
        user_error(&["grad", flag, "/nonexistent/x"], &[flag, "/nonexistent does not exist"]);
    }
    user_error(&["grad", "--out", d.to_str().unwrap()], &["is a directory"]);
    user_error(&["inspect", "--plot", "/nonexistent/h"], &["--plot /nonexistent/h.png"]);
    user_error(&["inspect", "--json", under_file.to_str().unwrap()], &["--json", "is not a directory"]);
    user_error(&["train-plot", "--out", "/nonexistent/c", file.to_str().unwrap()], &["--out /nonexistent/c.png"]);
    user_error(
        &["attn", "--input", &fixture("attention/input.safetensors"), "--out", "/nonexistent/o.safetensors"],
        &["--out /nonexistent/o.safetensors"],
    );
    user_error(&["export", d.to_str().unwrap(), "--out", file.to_str().unwrap()], &["--out", "not a directory"]);
}

/// A safetensors file of F32 q, k, v (and do) of shape [1, n, 1, 4], every value `qk` (q, k) or 1.
/// `q`, `v`, `do` constant; `k` rows of alternating sign `±qk` (keys that all equal one vector
/// would be exact after the reference-point shift, MATH §3, and could not overflow).
fn attn_input(path: &Path, n: usize, qk: f32) {
    let t = |name: &str, v: f32| (name.to_string(), vec![1, n, 1, 4], vec![v; n * 4]);
    let k = ("k".to_string(), vec![1, n, 1, 4], (0..n * 4).map(|i| if (i / 4) % 2 == 0 { qk } else { -qk }).collect());
    altgrad::io::write_safetensors(path, &[t("q", qk), k, t("v", 1.0), t("do", 1.0)]).unwrap();
}

#[test]
fn non_finite_results_fail_with_exit_2() {
    let d = tmpdir("nonfinite");
    let (inp, out) = (d.join("in.safetensors"), d.join("o.safetensors"));
    let (i, o) = (inp.to_str().unwrap(), out.to_str().unwrap());
    // Polynomial degree 8 with |scores| ≈ 4e5 (finite f32 inputs) overflows T_8.
    attn_input(&inp, 6, 450.0);
    user_error(
        &["attn", "--input", i, "--out", o, "--attention", "poly", "--degree", "8"],
        &["attention output o", "not finite", "float64", "lower --degree"],
    );
    // Exact attention with |τ q·k| above 3.4e38.
    attn_input(&inp, 6, 1e20);
    user_error(&["attn", "--input", i, "--out", o], &["attention output o", "float64"]);
    assert!(!out.exists(), "nothing written");
    // grad: a model whose scores are large, forced to degree 8.
    let m = d.join("model");
    let cfg = altgrad::model::LlamaConfig {
        vocab_size: 16,
        hidden_size: 16,
        intermediate_size: 16,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_layout: altgrad::model::RopeLayout::RotateHalf,
        max_seq_len: 64,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        built_in_attention: None,
    };
    let mut w = altgrad::model::LlamaWeights::<f32>::random_hf(&cfg, 2);
    let l0 = &mut w.layers[0];
    for x in l0.q_proj.weight.data.iter_mut().chain(l0.k_proj.weight.data.iter_mut()) {
        *x *= 3000.0;
    }
    altgrad::io::save_hf_llama(&m, &cfg, &w).unwrap();
    let toks = d.join("t.txt");
    std::fs::write(&toks, "1 2 3 4 5 6 7 8 9 10 11 12").unwrap();
    let g = d.join("g.safetensors");
    let err = user_error(
        &[
            "grad",
            "--model",
            m.to_str().unwrap(),
            "--tokens",
            toks.to_str().unwrap(),
            "--attention",
            "poly",
            "--degree",
            "8",
            "--force",
            "--out",
            g.to_str().unwrap(),
        ],
        &["not finite", "--dtype f64", "lower --degree"],
    );
    assert!(!g.exists(), "no NaN gradients written: {err}");
}

#[test]
fn checkpoints_work_as_models_and_export() {
    let d = tmpdir("ckpt");
    let ck = d.join("ck");
    let o = altgrad(&[
        "train",
        "--task",
        "mqar",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--vocab",
        "16",
        "--seq-len",
        "16",
        "--batch-size",
        "1",
        "--steps",
        "2",
        "--checkpoint",
        ck.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let toks = d.join("t.txt");
    std::fs::write(&toks, "1 5 9 2 6 10 3 7").unwrap();
    let text = d.join("x.txt");
    std::fs::write(&text, "\u{7}\u{3}").unwrap();
    let c = ck.to_str().unwrap();
    let loss = |model: &str| -> f64 {
        let o = altgrad(&["grad", "--model", model, "--tokens", toks.to_str().unwrap(), "--json", "-"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["loss"].as_f64().unwrap()
    };
    let l_ck = loss(c);
    let o = altgrad(&["inspect", "--model", c, "--tokens", toks.to_str().unwrap(), "--json", "-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = altgrad(&["tokenize", "--model", c, "--text", text.to_str().unwrap()]);
    assert_eq!(stdout(&o).trim(), "7 3", "a checkpoint of tiny reads bytes: {}", stderr(&o));
    let hf = d.join("hf");
    let o = altgrad(&["export", c, "--out", hf.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(hf.join("config.json").is_file() && hf.join("model.safetensors").is_file());
    assert_eq!(loss(hf.to_str().unwrap()), l_ck, "the exported model computes the same loss");
}

#[test]
fn what_a_new_user_met() {
    let d = tmpdir("newuser");
    let hello = d.join("hello.txt");
    std::fs::write(&hello, "Hello").unwrap();
    let h = hello.to_str().unwrap();
    // An HF directory without tokenizer.json asks for token ids.
    user_error(&["grad", "--model", &fixture("llama_tiny"), "--text", h], &["no tokenizer", "--tokens"]);
    // A learning rate that makes training diverge.
    user_error(
        &[
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
            "40",
            "--batch-size",
            "2",
            "--lr",
            "1e3",
        ],
        &["diverged at step", "lower --lr"],
    );
    // --seq-len above the text's length says how many tokens were used.
    let o = altgrad(&["grad", "--text", h, "--seq-len", "500"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("--seq-len 500 is more than the 5 tokens"), "{}", stderr(&o));
    // attn --help lists only the methods attn takes.
    let help = stdout(&altgrad(&["attn", "--help"]));
    assert!(help.contains("altgrad") && !help.contains("auto"), "{help}");
    // --scale -1 parses (and is refused by value, not as an unknown flag).
    let inp = d.join("in.safetensors");
    attn_input(&inp, 3, 0.5);
    let i = inp.to_str().unwrap();
    let out = d.join("o.safetensors");
    let o_ = out.to_str().unwrap();
    user_error(&["attn", "--input", i, "--out", o_, "--scale", "-1"], &["--scale: must be a positive number, got -1"]);
    // F16 and BF16 inputs give outputs in their dtype.
    let t = |name: &str| (name.to_string(), vec![1usize, 3, 1, 4], vec![0.25f32; 12]);
    for dt in ["F16", "BF16"] {
        altgrad::io::write_safetensors_as(&inp, &[t("q"), t("k"), t("v"), t("do")], dt).unwrap();
        let o = altgrad(&["attn", "--input", i, "--out", o_]);
        assert!(o.status.success(), "{}", stderr(&o));
        let r = altgrad::io::read_safetensors(&out).unwrap();
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|x| x.dtype == dt), "{dt}: {:?}", r.iter().map(|x| &x.dtype).collect::<Vec<_>>());
    }
    // Batch 0 is rejected.
    let z = |name: &str| (name.to_string(), vec![0usize, 3, 1, 4], Vec::<f32>::new());
    altgrad::io::write_safetensors(&inp, &[z("q"), z("k"), z("v")]).unwrap();
    user_error(&["attn", "--input", i, "--out", o_], &["batch size 0"]);
    // inspect writes a heatmap only with --plot.
    let o = bin().current_dir(&d).args(["inspect", "--seq-len", "32"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!d.join("inspect_degrees.png").exists() && !stdout(&o).contains("heatmap"));
    // Empty text is refused (whatever the model).
    let empty = d.join("empty.txt");
    std::fs::write(&empty, " \n").unwrap();
    user_error(&["grad", "--text", empty.to_str().unwrap()], &["empty.txt", "is empty"]);
    // No doubled prefixes, no "is overflows", no "0.0 GFLOP".
    let e = user_error(&["grad", "--attention", "poly", "--degree", "3"], &["--degree: degree must be even"]);
    assert!(!e.contains("degree: degree:"), "{e}");
    let big = d.join("d64.safetensors");
    let t64 = |name: &str| (name.to_string(), vec![1usize, 2, 1, 64], vec![0.1f32; 128]);
    altgrad::io::write_safetensors(&big, &[t64("q"), t64("k"), t64("v")]).unwrap();
    let e = user_error(
        &["attn", "--input", big.to_str().unwrap(), "--out", o_, "--attention", "poly", "--degree", "40"],
        &["--degree"],
    );
    assert!(!e.contains("is overflows") && !e.contains("degree: degree:"), "{e}");
    let o = altgrad(&["grad", "--seq-len", "8", "--attention", "poly", "--degree", "4"]);
    let e = stderr(&o);
    assert!(!e.contains(" 0.0 GFLOP") && !e.contains("vs 0.0"), "{e}");
}

#[test]
fn architecture_mentions_only_real_flags() {
    let doc =
        std::fs::read_to_string(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ARCHITECTURE.md"))).unwrap();
    let mut help = String::new();
    for sub in ["grad", "attn", "inspect", "tokenize", "train", "train-plot", "bench", "export"] {
        help.push_str(&stdout(&altgrad(&[sub, "--help"])));
    }
    let mut flags: Vec<&str> = doc
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w[2..].starts_with(|c: char| c.is_ascii_lowercase()))
        .collect();
    flags.sort_unstable();
    flags.dedup();
    assert!(!flags.is_empty());
    for f in flags {
        assert!(
            help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n")) || help.contains(&format!("{f}=")),
            "ARCHITECTURE.md mentions {f}, which no subcommand has"
        );
    }
}
