//! JSON report types (serde) shared by `grad`, `attn`, `bench`.
