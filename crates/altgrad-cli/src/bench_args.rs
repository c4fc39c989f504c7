//! The `altgrad bench` arguments (clap), so the CLI wires the subcommand in one line:
//! `Bench(bench_args::BenchArgs)` → `run_bench(&args.options(), progress)`.

use altgrad::bench::BenchOptions;
use altgrad::{Error, Result};
use std::path::PathBuf;

/// Arguments of `altgrad bench` (ARCHITECTURE "CLI contract": `altgrad bench [--quick] [--out DIR]`;
/// the rest are optional overrides).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct BenchArgs {
    /// n up to 8192 and fewer configurations (about 2 minutes on 2 cores); default: the full sweep to n = 65536.
    #[arg(long)]
    pub quick: bool,
    /// Output directory: bench.json, bench.csv, bench.md and the plots (PNG + SVG).
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,
    /// Sequence lengths, comma-separated (replaces the sweep's), e.g. 1024,4096.
    #[arg(long, value_name = "N,N,…", value_parser = parse_usize_list)]
    pub ns: Option<::std::vec::Vec<usize>>,
    /// head_dim:degree pairs of the poly method, e.g. 16:2,64:2 (`none` for none).
    #[arg(long, value_name = "D:G,…", value_parser = parse_pairs)]
    pub poly: Option<::std::vec::Vec<(usize, usize)>>,
    /// head_dim:degree pairs of the altgrad method, e.g. 16:2 (`none` for none).
    #[arg(long, value_name = "D:G,…", value_parser = parse_pairs)]
    pub altgrad: Option<::std::vec::Vec<(usize, usize)>>,
    /// Head widths of exact attention, e.g. 16,64 (`none` for none).
    #[arg(long, value_name = "D,D,…", value_parser = parse_usize_list)]
    pub exact: Option<::std::vec::Vec<usize>>,
    /// Skip a point whose predicted single fwd+bwd exceeds S seconds (default 4 with --quick, else 300).
    #[arg(long, value_name = "S")]
    pub limit: Option<f64>,
    /// Query heads (= key/value heads) per point.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Causal chunk C of poly/altgrad.
    #[arg(long, default_value_t = altgrad::attention::poly::DEFAULT_CHUNK)]
    pub chunk: usize,
    /// Non-causal streaming chunk of poly/altgrad.
    #[arg(long, default_value_t = 256)]
    pub stream_chunk: usize,
    /// Skip the claims (b) error vs n and (c) multi-layer error.
    #[arg(long)]
    pub no_claims: bool,
    /// Skip the roofline stage breakdown.
    #[arg(long)]
    pub no_roofline: bool,
    /// No progress bar on stderr.
    #[arg(long)]
    pub no_progress: bool,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A seconds-long sweep (n ≤ 256) for tests of the report's files.
    #[arg(long, hide = true)]
    pub tiny: bool,
}

impl BenchArgs {
    /// The [`BenchOptions`] these arguments ask for.
    pub fn options(&self) -> BenchOptions {
        let mut o = BenchOptions::new(&self.out);
        o.quick = self.quick;
        o.ns = self.ns.clone();
        o.poly_configs = self.poly.clone();
        o.altgrad_configs = self.altgrad.clone();
        o.exact_dims = self.exact.clone();
        o.limit_s = self.limit;
        o.heads = self.heads;
        o.chunk = self.chunk;
        o.stream_chunk = self.stream_chunk;
        o.claims = !self.no_claims;
        o.roofline = !self.no_roofline;
        o.seed = self.seed;
        o.tiny = self.tiny;
        o
    }
}

fn is_none(s: &str) -> bool {
    let t = s.trim();
    t.is_empty() || t.eq_ignore_ascii_case("none")
}

/// Parses `1024,4096` (or `none`/empty → empty list). Errors: [`Error::BadInput`] naming the item.
pub fn parse_usize_list(s: &str) -> Result<Vec<usize>> {
    if is_none(s) {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|x| {
            x.trim().parse::<usize>().map_err(|_| {
                Error::bad("list", format!("`{}` is not a non-negative integer (expected e.g. 1024,4096)", x.trim()))
            })
        })
        .collect()
}

/// Parses `16:2,64:2` into `(head_dim, degree)` pairs (or `none`/empty → empty list).
/// Errors: [`Error::BadInput`] naming the item.
pub fn parse_pairs(s: &str) -> Result<Vec<(usize, usize)>> {
    if is_none(s) {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|x| {
            let bad =
                || Error::bad("pairs", format!("`{}` is not head_dim:degree (expected e.g. 16:2,64:2)", x.trim()));
            let (d, g) = x.trim().split_once(':').ok_or_else(bad)?;
            Ok((d.trim().parse().map_err(|_| bad())?, g.trim().parse().map_err(|_| bad())?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        Bench(BenchArgs),
    }

    #[test]
    fn bench_args_parse_into_options() {
        use clap::Parser;
        let Cmd::Bench(a) = Cli::try_parse_from(["altgrad", "bench", "--quick", "--out", "/tmp/x"]).unwrap().cmd;
        let o = a.options();
        assert!(o.quick && o.claims && o.roofline && !a.no_progress);
        assert_eq!(o.out_dir, PathBuf::from("/tmp/x"));
        assert_eq!((o.heads, o.ns.clone(), o.poly_configs.clone()), (4, None, None));
        assert_eq!(o.command_line(), "altgrad bench --quick --out /tmp/x");
        let Cmd::Bench(a) = Cli::try_parse_from([
            "altgrad",
            "bench",
            "--ns",
            "256,512",
            "--poly",
            "16:2,64:4",
            "--altgrad",
            "none",
            "--exact",
            "16",
            "--limit",
            "2.5",
            "--no-claims",
            "--no-roofline",
            "--no-progress",
        ])
        .unwrap()
        .cmd;
        let o = a.options();
        assert_eq!(o.ns, Some(vec![256, 512]));
        assert_eq!(o.poly_configs, Some(vec![(16, 2), (64, 4)]));
        assert_eq!(o.altgrad_configs, Some(vec![]));
        assert_eq!(o.exact_dims, Some(vec![16]));
        assert_eq!(o.limit_s, Some(2.5));
        assert!(!o.claims && !o.roofline && a.no_progress && !o.quick);
        assert_eq!(o.out_dir, PathBuf::from("bench-out"));
        // the report's command line parses back into the same options (`none` for an empty list)
        let line = o.command_line();
        assert!(line.contains(" --altgrad none "), "{line}");
        let Cmd::Bench(b) = Cli::try_parse_from(line.split_whitespace()).unwrap().cmd;
        let p = b.options();
        assert_eq!(
            (p.ns, p.poly_configs, p.altgrad_configs, p.exact_dims),
            (o.ns, o.poly_configs, o.altgrad_configs, o.exact_dims)
        );
        assert!(Cli::try_parse_from(["altgrad", "bench", "--poly", "16-2"]).is_err());
        assert!(Cli::try_parse_from(["altgrad", "bench", "--ns", "1k"]).is_err());
    }
}
