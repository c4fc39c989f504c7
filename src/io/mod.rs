//! Files in and out: HF model directories, token files, safetensors output.
