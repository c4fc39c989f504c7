//! `altgrad bench`: a tiny run of the binary (n ≤ 256) checks the JSON keys, the CSV header and
//! that every plot exists; bad options through the library entry point `bench::run_bench`. No
//! timing assertions.
//!
//! `bench_driver` (ignored) is a small driver for `bench/torch_compare.py` and for running the
//! sweep before the CLI subcommand exists: `ALTGRAD_BENCH_OUT=DIR cargo test --release --test
//! bench_cli -- --ignored bench_driver` with optional `ALTGRAD_BENCH_QUICK=1`,
//! `ALTGRAD_BENCH_NS=512,1024`, `ALTGRAD_BENCH_POLY=16:2,64:2`, `ALTGRAD_BENCH_ALTGRAD=16:2` (empty:
//! none), `ALTGRAD_BENCH_EXACT=16,64`, `ALTGRAD_BENCH_LIMIT=S`, `ALTGRAD_BENCH_NO_CLAIMS=1`,
//! `ALTGRAD_BENCH_NO_ROOFLINE=1`.

use altgrad::bench::{run_bench, BenchOptions};
use std::path::PathBuf;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("altgrad-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn tiny_bench_writes_json_csv_and_plots() {
    let dir = tmpdir("tiny");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_altgrad"))
        .args(["bench", "--tiny", "--quick", "--no-progress", "--out"])
        .arg(&dir)
        .output()
        .expect("altgrad bench runs");
    assert!(out.status.success(), "altgrad bench failed: {}", String::from_utf8_lossy(&out.stderr));

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).expect("bench.json parses");
    for k in
        ["gemm_peak_gflops", "runs", "fits", "claims", "skipped", "roofline", "threads", "memory_method", "command"]
    {
        assert!(v.get(k).is_some(), "bench.json lacks {k}");
    }
    assert!(v["gemm_peak_gflops"].as_f64().unwrap() > 0.0);
    // the report names the SIMD level the kernels ran at (a capped run's "% of peak" falls)
    let cpu = v["cpu"].as_str().unwrap();
    assert!(["(SIMD avx512", "(SIMD avx2", "(SIMD generic"].iter().any(|l| cpu.contains(l)), "cpu {cpu:?}");
    let runs = v["runs"].as_array().unwrap();
    for m in ["exact", "poly", "altgrad"] {
        assert!(runs.iter().any(|r| r["method"] == m), "no {m} run");
    }
    for r in runs {
        for k in ["method", "n", "head_dim", "degree", "causal", "median_s", "gflops", "peak_rss_bytes"] {
            assert!(r.get(k).is_some(), "run lacks {k}: {r}");
        }
        assert!(r["n"].as_u64().unwrap() <= 512);
        assert!(r["median_s"].as_f64().unwrap() > 0.0);
    }
    // approximate runs carry an error against exact on bounded inputs
    assert!(runs.iter().filter(|r| r["method"] != "exact").all(|r| r["err_grad"].as_f64().is_some()));
    for f in v["fits"].as_array().unwrap() {
        for k in ["method", "head_dim", "degree", "causal", "exponent"] {
            assert!(f.get(k).is_some(), "fit lacks {k}: {f}");
        }
    }
    let claims = &v["claims"];
    for k in ["time_exponent", "error_vs_n", "multi_layer", "crossover", "markdown"] {
        assert!(claims.get(k).is_some(), "claims lack {k}");
    }
    assert!(claims["markdown"].as_str().unwrap().contains("| claim | what we measured | command |"));
    assert!(!claims["error_vs_n"]["points"].as_array().unwrap().is_empty());
    assert!(!claims["multi_layer"]["points"].as_array().unwrap().is_empty());

    let csv = std::fs::read_to_string(dir.join("bench.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert_eq!(header, altgrad::bench::CSV_HEADER);
    for col in ["method", "n", "head_dim", "degree", "causal", "median_s", "gflops", "peak_rss_bytes"] {
        assert!(header.split(',').any(|c| c == col), "CSV header lacks {col}");
    }
    assert_eq!(lines.count(), runs.len());

    for stem in [
        "time_vs_n_noncausal",
        "time_vs_n_causal",
        "speedup_vs_n_noncausal",
        "speedup_vs_n_causal",
        "error_o_vs_n_noncausal",
        "error_grad_vs_n_causal",
        "claim_error_vs_n",
        "claim_multilayer",
    ] {
        for ext in ["png", "svg"] {
            let p = dir.join(format!("{stem}.{ext}"));
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{} missing or empty", p.display());
        }
    }
    assert!(std::fs::read_to_string(dir.join("bench.md")).unwrap().contains("## Paper claims"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_options_are_user_errors() {
    let mut o = BenchOptions::new(tmpdir("bad"));
    o.tiny = true;
    o.poly_configs = Some(vec![(8, 3)]);
    let e = run_bench(&o, &|_| {}).unwrap_err();
    assert!(e.is_user_error() && e.to_string().contains("even") && e.to_string().starts_with("--poly: "), "{e}");
    o.poly_configs = None;
    o.ns = Some(vec![0]);
    assert!(run_bench(&o, &|_| {}).unwrap_err().is_user_error());
    o.ns = Some(vec![]);
    let e = run_bench(&o, &|_| {}).unwrap_err();
    assert!(e.is_user_error() && e.to_string().contains("--ns: the list is empty"), "{e}");
    o.ns = None;
    // an output "directory" that is a file
    let file = tmpdir("bad-out-file").with_extension("txt");
    std::fs::write(&file, b"x").unwrap();
    let mut f = BenchOptions::new(&file);
    f.tiny = true;
    let e = run_bench(&f, &|_| {}).unwrap_err();
    assert!(e.is_user_error() && e.to_string().contains("not a directory"), "{e}");
    let _ = std::fs::remove_file(&file);
    let mut empty = BenchOptions::new(tmpdir("empty"));
    (empty.tiny, empty.claims, empty.roofline) = (true, false, false);
    (empty.poly_configs, empty.altgrad_configs, empty.exact_dims) = (Some(vec![]), Some(vec![]), Some(vec![]));
    let e = run_bench(&empty, &|_| {}).unwrap_err();
    assert!(e.is_user_error() && e.to_string().contains("nothing to run"), "{e}");
    // lengths whose tensors cannot fit are refused before anything is allocated (an allocation
    // failure would abort the process)
    if altgrad::bench::available_memory_bytes().is_some() {
        for n in [99_999_999_999_999, usize::MAX] {
            o.ns = Some(vec![256, n]);
            let e = run_bench(&o, &|_| {}).unwrap_err();
            assert!(e.is_user_error() && e.to_string().contains(&format!("--ns: n = {n} needs")), "{e}");
        }
    }
}

fn env_list<T>(key: &str, parse: impl Fn(&str) -> Option<T>) -> Option<Vec<T>> {
    let v = std::env::var(key).ok()?;
    Some(
        v.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse(s.trim()).unwrap_or_else(|| panic!("{key}: bad item {s}")))
            .collect(),
    )
}

fn pair(s: &str) -> Option<(usize, usize)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[test]
#[ignore = "driver: runs the benchmark sweep; set ALTGRAD_BENCH_OUT"]
fn bench_driver() {
    let out = std::env::var("ALTGRAD_BENCH_OUT").expect("set ALTGRAD_BENCH_OUT=DIR");
    let flag = |k: &str| std::env::var(k).map(|v| v == "1").unwrap_or(false);
    let mut o = BenchOptions::new(out);
    o.quick = flag("ALTGRAD_BENCH_QUICK");
    o.ns = env_list("ALTGRAD_BENCH_NS", |s| s.parse().ok());
    o.poly_configs = env_list("ALTGRAD_BENCH_POLY", pair);
    o.altgrad_configs = env_list("ALTGRAD_BENCH_ALTGRAD", pair);
    o.exact_dims = env_list("ALTGRAD_BENCH_EXACT", |s| s.parse().ok());
    o.limit_s = std::env::var("ALTGRAD_BENCH_LIMIT").ok().map(|s| s.parse().expect("ALTGRAD_BENCH_LIMIT"));
    o.claims = !flag("ALTGRAD_BENCH_NO_CLAIMS");
    o.roofline = !flag("ALTGRAD_BENCH_NO_ROOFLINE");
    let r = run_bench(&o, &|_| {}).expect("bench");
    println!("{}", r.markdown());
}
