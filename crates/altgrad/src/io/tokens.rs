//! Token-id files: whitespace-separated non-negative integers.

use crate::{Error, Result};
use std::path::Path;

/// Reads a text file of whitespace-separated (spaces, tabs, newlines) non-negative integer token
/// ids, in order. A leading `+` is accepted; nothing else is.
///
/// Errors: `Io` naming the file if it cannot be read; `BadInput` naming the file if it is not
/// UTF-8, holds no ids ("no token ids"), or holds a token that is not an integer in
/// `0..=u32::MAX` — the message gives the token's 1-based position, its line and its text.
/// Whether ids are below the model's vocabulary size is the caller's check.
pub fn read_tokens(path: &Path) -> Result<Vec<u32>> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(&shown, e))?;
    parse_tokens(&shown, &bytes)
}

/// The token ids in the bytes of a token-id file (see [`read_tokens`]); `shown` names the file
/// in messages.
pub(crate) fn parse_tokens(shown: &str, bytes: &[u8]) -> Result<Vec<u32>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Error::bad(shown, format!("not UTF-8 text (invalid byte at offset {})", e.valid_up_to())))?;
    let mut ids = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        for tok in line.split_whitespace() {
            let pos = ids.len() + 1;
            let id = tok.parse::<u32>().map_err(|_| {
                let why = if tok.parse::<i128>().is_ok_and(|v| v < 0) {
                    "is negative; token ids are non-negative integers"
                } else if tok.strip_prefix('+').unwrap_or(tok).bytes().all(|b| b.is_ascii_digit()) && tok != "+" {
                    "is out of range for a token id (at most 4294967295)"
                } else {
                    "is not a non-negative integer"
                };
                let shown_tok: String = tok.chars().take(40).collect();
                let ell = if tok.chars().count() > 40 { "…" } else { "" };
                Error::bad(shown, format!("token {pos} (line {}) \"{shown_tok}{ell}\" {why}", line_no + 1))
            })?;
            ids.push(id);
        }
    }
    if ids.is_empty() {
        return Err(Error::bad(shown, "no token ids (the file is empty or only whitespace)"));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tensors::tests::TempDir;

    fn write(d: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = d.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_ids_across_lines() {
        let d = TempDir::new("tok");
        let p = write(&d, "t.txt", " 1 2\t3\n\n4294967295\r\n+5 0\n");
        assert_eq!(read_tokens(&p).unwrap(), vec![1, 2, 3, 4294967295, 5, 0]);
    }

    #[test]
    fn errors_name_file_position_and_text() {
        let d = TempDir::new("tokbad");
        let p = write(&d, "a.txt", "12 abc 7");
        let e = read_tokens(&p).unwrap_err().to_string();
        assert!(e.contains("a.txt") && e.contains("token 2 (line 1) \"abc\""), "{e}");
        let p = write(&d, "b.txt", "1\n-3");
        let e = read_tokens(&p).unwrap_err().to_string();
        assert!(e.contains("token 2 (line 2) \"-3\" is negative"), "{e}");
        let p = write(&d, "c.txt", "4294967296");
        assert!(read_tokens(&p).unwrap_err().to_string().contains("out of range"));
        let p = write(&d, "d.txt", " \n\t ");
        assert!(read_tokens(&p).unwrap_err().to_string().contains("no token ids"));
        let p = d.0.join("e.txt");
        std::fs::write(&p, [0x31, 0x20, 0xff]).unwrap();
        assert!(read_tokens(&p).unwrap_err().to_string().contains("not UTF-8"));
        let e = read_tokens(&d.0.join("missing.txt")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("missing.txt"));
    }
}
