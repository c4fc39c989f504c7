//! Files in and out: HF model directories, token files, safetensors output.
//!
//! - [`load_hf_llama`] / [`save_hf_llama`]: an HF Llama directory (`config.json` +
//!   `model.safetensors`, or a sharded `model.safetensors.index.json` + shards) to and from
//!   [`crate::model::LlamaConfig`] + [`crate::model::LlamaWeights`]; [`read_hf_llama_config`]
//!   reads the config alone.
//! - [`read_tokens`]: a text file of whitespace-separated token ids.
//! - [`read_safetensors`] / [`write_safetensors`]: named tensors for the CLI (`attn` inputs,
//!   gradients, hidden states); writes are atomic (temporary file, fsync, rename), as is
//!   [`write_file_atomic`].
//! - [`check_finite`]: the finiteness check applied to every loaded tensor.
//!
//! Every error names the file (and the tensor or token at fault) and is a
//! [`crate::Error::BadInput`] or [`crate::Error::Io`]; hostile or truncated files never panic.

pub mod attn_file;
pub(crate) mod bert;
mod bytes;
mod cleanup;
pub use bert::load_hf_bert;
pub mod gguf;
pub(crate) mod hf;
mod loader;
mod outputs;
pub(crate) mod tensors;
pub mod tokenizer;
pub(crate) mod tokens;

pub(crate) use cleanup::create_registered_dir as cleanup_create_dir;
pub use cleanup::{forget_temporary, register_temporary_file, remove_temporary_files};
pub use hf::{load_hf_llama, read_hf_llama_config, save_hf_llama};
pub use loader::{gguf_tokenizer_parts, load_model, AnyModel, Loaded};
pub use outputs::{check_output_dir, check_output_file, check_plot_stem};
pub use tensors::{
    check_finite, read_safetensors, read_safetensors_bytes, write_file_atomic, write_safetensors, write_safetensors_as,
    TensorF64,
};
pub use tokens::read_tokens;
