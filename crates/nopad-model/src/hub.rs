//! Hub ids (`meta-llama/Llama-3.1-8B`) resolved to a model directory in the local Hugging Face
//! cache, the way `huggingface_hub` lays it out, so `--model` takes what a user types into
//! `from_pretrained`. nopad never downloads: an id that is not in the cache is an error that
//! says where it looked and how to fetch it.
//!
//! Layout (`huggingface_hub`'s cache): `<cache>/models--<org>--<name>/refs/<revision>` holds a
//! commit hash, and `<cache>/models--<org>--<name>/snapshots/<hash>/` the files of that commit.
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Whether `s` has the shape of a Hub id: `org/name` (one slash, neither part empty, no path
/// syntax). An existing path is never taken for an id by the caller, which checks it first.
pub fn looks_like_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name)
}

/// The Hub cache directory from the environment (`lookup` reads a variable).
pub fn cache_dir(lookup: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| lookup(k).filter(|v| !v.is_empty());
    if let Some(d) = set("HF_HUB_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = set("HF_HOME") {
        return Some(PathBuf::from(d).join("hub"));
    }
    set("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The snapshot directory of `id` at `revision` (`main` when None) in `cache`.
///
/// Errors name the directory looked at: the id not in the cache (with the command that fetches
/// it), no such revision, or a ref naming a snapshot that is not there.
pub fn resolve_in(cache: &Path, id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(ModelError::Input(format!(
            "--model {id}: not a directory, and not in the Hugging Face cache ({} does not exist); \
             nopad does not download: fetch it with `huggingface-cli download {id}` (or give a \
             model directory)",
            repo.display()
        )));
    }
    let rev = revision.unwrap_or("main");
    let ref_file = repo.join("refs").join(rev);
    let hash = if ref_file.is_file() {
        fs::read_to_string(&ref_file)
            .map_err(|e| ModelError::io(&ref_file, e))?
            .trim()
            .to_string()
    } else {
        // A revision may be given as a commit hash itself.
        rev.to_string()
    };
    let snap = repo.join("snapshots").join(&hash);
    if hash.is_empty() || hash.contains('/') || !snap.is_dir() {
        return Err(ModelError::Input(format!(
            "--model {id}: revision `{rev}` is not in the cache ({} does not exist)",
            snap.display()
        )));
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        for id in ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B", "a/b.c_d-e"] {
            assert!(looks_like_hub_id(id), "{id}");
        }
        for not in [
            "llama",
            "./x/y",
            "/abs/path",
            "a/b/c",
            "a/",
            "/b",
            "../x",
            "a b/c",
            "",
        ] {
            assert!(!looks_like_hub_id(not), "{not}");
        }
    }

    #[test]
    fn the_cache_follows_huggingface_hubs_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            cache_dir(env(&[
                ("HF_HUB_CACHE", "/c"),
                ("HF_HOME", "/h"),
                ("HOME", "/u")
            ])),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            cache_dir(env(&[("HF_HOME", "/h"), ("HOME", "/u")])),
            Some(PathBuf::from("/h/hub"))
        );
        assert_eq!(
            cache_dir(env(&[("HF_HUB_CACHE", ""), ("HOME", "/u")])),
            Some(PathBuf::from("/u/.cache/huggingface/hub"))
        );
        assert_eq!(cache_dir(env(&[])), None);
    }

    #[test]
    fn a_cached_snapshot_is_found_by_ref_or_hash_and_a_missing_one_named() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--model");
        let hash = "0123456789abcdef0123456789abcdef01234567";
        fs::create_dir_all(repo.join("snapshots").join(hash)).unwrap();
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::write(repo.join("refs/main"), format!("{hash}\n")).unwrap();
        let snap = repo.join("snapshots").join(hash);
        assert_eq!(resolve_in(cache.path(), "org/model", None).unwrap(), snap);
        assert_eq!(
            resolve_in(cache.path(), "org/model", Some(hash)).unwrap(),
            snap
        );
        let e = resolve_in(cache.path(), "org/model", Some("v2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("revision `v2`"), "{e}");
        let e = resolve_in(cache.path(), "org/other", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models--org--other") && e.contains("huggingface-cli download org/other"),
            "{e}"
        );
        // A ref naming a snapshot that is gone.
        fs::write(repo.join("refs/main"), "feedbeef").unwrap();
        assert!(resolve_in(cache.path(), "org/model", None).is_err());
    }
}
