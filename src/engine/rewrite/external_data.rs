//! External data that lives somewhere else than beside the graph: the Hugging Face cache.
//!
//! A hub snapshot holds relative symlinks into the cache's content store
//! (`snapshots/<rev>/onnx/decoder_model_merged.onnx_data -> ../../../blobs/<sha256>`). ONNX Runtime
//! (≥ 1.30) resolves every external-data path and refuses one whose real file is outside the model's
//! folder ("External data path escapes model directory"); for a graph handed over in memory, that
//! folder is the one set in `session.model_external_initializers_file_folder_path`. So a snapshot's
//! links are resolved here instead: the folder becomes the real folder that holds the data files
//! (`blobs/`), and each tensor's `location` becomes the real file's path relative to it. ONNX Runtime
//! then reads (maps) the same files from disk as it would from a plain folder: no copy in memory, no
//! extra load time.
//!
//! Only a location that names a file inside the graph's folder (a plain relative path, no `..`, not
//! absolute) is followed through its links; anything else is left for ONNX Runtime to refuse, so the
//! rule it enforces (a model reads only its own folder's files) still holds for the folder the user
//! gave.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use super::wire::*;
use super::RewriteError;

/// The `location`s of every tensor stored as external data in a serialized `ModelProto`:
/// initializers, sparse initializers and tensor attributes, in the main graph and its subgraphs.
pub fn external_data_locations(model: &[u8]) -> Result<BTreeSet<String>, RewriteError> {
    let mut out = BTreeSet::new();
    for f in fields(model) {
        let f = f?;
        if f.num == MODEL_GRAPH && f.wire == WIRE_LEN {
            graph_locations(f.body, &mut out)?;
        }
    }
    Ok(out)
}

fn graph_locations(graph: &[u8], out: &mut BTreeSet<String>) -> Result<(), RewriteError> {
    for f in fields(graph) {
        let f = f?;
        match (f.num, f.wire) {
            (GRAPH_INITIALIZER, WIRE_LEN) => tensor_location(f.body, out)?,
            (GRAPH_SPARSE_INITIALIZER, WIRE_LEN) => sparse_locations(f.body, out)?,
            (GRAPH_NODE, WIRE_LEN) => {
                for a in fields(f.body) {
                    let a = a?;
                    if a.num == NODE_ATTRIBUTE && a.wire == WIRE_LEN {
                        attribute_locations(a.body, out)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn attribute_locations(attr: &[u8], out: &mut BTreeSet<String>) -> Result<(), RewriteError> {
    for f in fields(attr) {
        let f = f?;
        match (f.num, f.wire) {
            (ATTR_T | ATTR_TENSORS, WIRE_LEN) => tensor_location(f.body, out)?,
            (ATTR_SPARSE_TENSOR | ATTR_SPARSE_TENSORS, WIRE_LEN) => sparse_locations(f.body, out)?,
            (ATTR_G | ATTR_GRAPHS, WIRE_LEN) => graph_locations(f.body, out)?,
            _ => {}
        }
    }
    Ok(())
}

fn sparse_locations(sparse: &[u8], out: &mut BTreeSet<String>) -> Result<(), RewriteError> {
    for f in fields(sparse) {
        let f = f?;
        if matches!(f.num, SPARSE_VALUES | SPARSE_INDICES) && f.wire == WIRE_LEN {
            tensor_location(f.body, out)?;
        }
    }
    Ok(())
}

fn tensor_location(tensor: &[u8], out: &mut BTreeSet<String>) -> Result<(), RewriteError> {
    for f in fields(tensor) {
        let f = f?;
        if f.num == TENSOR_EXTERNAL_DATA && f.wire == WIRE_LEN {
            if let Some(loc) = entry_location(f.body)? {
                out.insert(loc.to_string());
            }
        }
    }
    Ok(())
}

/// The value of a `StringStringEntryProto` whose key is `location`.
pub(super) fn entry_location(entry: &[u8]) -> Result<Option<&str>, RewriteError> {
    let (mut key, mut value) = ("", "");
    for f in fields(entry) {
        let f = f?;
        match (f.num, f.wire) {
            (ENTRY_KEY, WIRE_LEN) => key = text(f.body)?,
            (ENTRY_VALUE, WIRE_LEN) => value = text(f.body)?,
            _ => {}
        }
    }
    Ok((key == "location").then_some(value))
}

/// A `TensorProto`'s `location` entries renamed by `map` (`None` when none is in it).
pub(super) fn relocate_tensor(
    tensor: &[u8],
    map: &BTreeMap<String, String>,
) -> Result<Option<Vec<u8>>, RewriteError> {
    let mut out = Vec::with_capacity(tensor.len() + 64);
    let mut changed = false;
    for f in fields(tensor) {
        let f = f?;
        if f.num == TENSOR_EXTERNAL_DATA && f.wire == WIRE_LEN {
            if let Some(new) = entry_location(f.body)?.and_then(|l| map.get(l)) {
                let mut entry = Vec::with_capacity(16 + new.len());
                put_bytes(&mut entry, ENTRY_KEY, b"location");
                put_bytes(&mut entry, ENTRY_VALUE, new.as_bytes());
                put_bytes(&mut out, TENSOR_EXTERNAL_DATA, &entry);
                changed = true;
                continue;
            }
        }
        out.extend_from_slice(f.raw);
    }
    Ok(changed.then_some(out))
}

/// A `TensorProto` whose inline `raw_data` (at least `min_bytes`) is turned into external data read
/// from the graph's own file: `location` names that file, the offset is where the bytes sit in it
/// (`base` is the address of the file's first byte in memory, `tensor` a slice of the same file).
/// ONNX Runtime then reads each tensor from the file once, instead of parsing a copy of every weight
/// into the protobuf and copying it again into the tensor.
pub(super) fn externalize_tensor(
    tensor: &[u8],
    base: usize,
    location: &str,
    min_bytes: usize,
) -> Result<Option<Vec<u8>>, RewriteError> {
    let mut raw = None;
    for f in fields(tensor) {
        let f = f?;
        match (f.num, f.wire) {
            (TENSOR_RAW_DATA, WIRE_LEN) => raw = Some(f.body),
            // Already external (or marked so): left as it is.
            (TENSOR_DATA_LOCATION | TENSOR_EXTERNAL_DATA, _) => return Ok(None),
            _ => {}
        }
    }
    let Some(raw) = raw.filter(|r| r.len() >= min_bytes) else {
        return Ok(None);
    };
    let offset = (raw.as_ptr() as usize)
        .checked_sub(base)
        .ok_or_else(|| RewriteError("a tensor's data lies outside the graph's file".into()))?;
    let mut out = Vec::with_capacity(tensor.len().min(4096) + 128);
    for f in fields(tensor) {
        let f = f?;
        if !(f.num == TENSOR_RAW_DATA && f.wire == WIRE_LEN) {
            out.extend_from_slice(f.raw);
        }
    }
    for (key, value) in [
        ("location", location.to_string()),
        ("offset", offset.to_string()),
        ("length", raw.len().to_string()),
    ] {
        let mut entry = Vec::with_capacity(16 + value.len());
        put_bytes(&mut entry, ENTRY_KEY, key.as_bytes());
        put_bytes(&mut entry, ENTRY_VALUE, value.as_bytes());
        put_bytes(&mut out, TENSOR_EXTERNAL_DATA, &entry);
    }
    put_tag(&mut out, TENSOR_DATA_LOCATION, WIRE_VARINT);
    put_varint(&mut out, TENSOR_LOCATION_EXTERNAL);
    Ok(Some(out))
}

/// A `SparseTensorProto` whose values or indices tensor has a `location` in `map`, renamed.
pub(super) fn relocate_sparse(
    sparse: &[u8],
    map: &BTreeMap<String, String>,
) -> Result<Option<Vec<u8>>, RewriteError> {
    let mut out = Vec::with_capacity(sparse.len() + 64);
    let mut changed = false;
    for f in fields(sparse) {
        let f = f?;
        if matches!(f.num, SPARSE_VALUES | SPARSE_INDICES) && f.wire == WIRE_LEN {
            if let Some(t) = relocate_tensor(f.body, map)? {
                put_bytes(&mut out, f.num, &t);
                changed = true;
                continue;
            }
        }
        out.extend_from_slice(f.raw);
    }
    Ok(changed.then_some(out))
}

/// Where ONNX Runtime is to read a graph's external data from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalDataFolder {
    /// The real folder (links resolved) that holds every data file.
    pub folder: PathBuf,
    /// Old `location` → the real file's path relative to `folder`; empty when the data files are plain
    /// files beside the graph.
    pub relocate: BTreeMap<String, String>,
}

/// Resolves the links of the external-data files a graph at `graph` names (`locations`, from
/// [`external_data_locations`]). A file that does not exist is an error naming it.
pub fn external_data_folder(
    graph: &Path,
    locations: &BTreeSet<String>,
) -> Result<ExternalDataFolder, String> {
    let dir = match graph.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let real_dir = std::fs::canonicalize(&dir)
        .map_err(|e| format!("cannot resolve the folder {}: {e}", dir.display()))?;
    let mut reals = Vec::new();
    for loc in locations {
        // A name ONNX Runtime would refuse anyway (absolute, `..`): not followed, left to it.
        if !Path::new(loc)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            continue;
        }
        let linked = dir.join(loc);
        let real = std::fs::canonicalize(&linked).map_err(|e| {
            format!(
                "external data file {loc:?} named by the graph ({}) cannot be opened: {e}",
                linked.display()
            )
        })?;
        if real != real_dir.join(loc) {
            reals.push((loc.clone(), real));
        }
    }
    if reals.is_empty() {
        return Ok(ExternalDataFolder {
            folder: real_dir,
            relocate: BTreeMap::new(),
        });
    }
    // Every location is renamed relative to the folder that holds all the real files (plain files
    // beside the graph included, when only some are links).
    let mut all = reals.clone();
    for loc in locations {
        if !reals.iter().any(|(l, _)| l == loc)
            && Path::new(loc)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            all.push((loc.clone(), real_dir.join(loc)));
        }
    }
    let mut folder = all[0].1.parent().unwrap_or(Path::new("/")).to_path_buf();
    for (_, real) in &all[1..] {
        while !real.starts_with(&folder) {
            if !folder.pop() {
                break;
            }
        }
    }
    let mut relocate = BTreeMap::new();
    for (loc, real) in all {
        let rel = real.strip_prefix(&folder).map_err(|_| {
            format!(
                "external data file {loc:?} resolves outside {}",
                folder.display()
            )
        })?;
        let rel = rel
            .to_str()
            .ok_or_else(|| format!("the real path of external data file {loc:?} is not UTF-8"))?;
        relocate.insert(loc, rel.to_string());
    }
    Ok(ExternalDataFolder { folder, relocate })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_files_need_no_relocation() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("m.onnx"), b"").unwrap();
        std::fs::write(tmp.path().join("m.onnx_data"), b"x").unwrap();
        let locs: BTreeSet<String> = ["m.onnx_data".to_string()].into();
        let f = external_data_folder(&tmp.path().join("m.onnx"), &locs).unwrap();
        assert_eq!(f.folder, std::fs::canonicalize(tmp.path()).unwrap());
        assert!(f.relocate.is_empty());
    }

    #[test]
    fn hub_links_resolve_to_the_blob_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = tmp.path().join("blobs");
        let onnx = tmp.path().join("snapshots/abc/onnx");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&onnx).unwrap();
        for (name, blob) in [
            ("m.onnx", "b1"),
            ("m.onnx_data", "b2"),
            ("m.onnx_data_1", "b3"),
        ] {
            std::fs::write(blobs.join(blob), b"x").unwrap();
            std::os::unix::fs::symlink(format!("../../../blobs/{blob}"), onnx.join(name)).unwrap();
        }
        let locs: BTreeSet<String> = ["m.onnx_data".into(), "m.onnx_data_1".into()].into();
        let f = external_data_folder(&onnx.join("m.onnx"), &locs).unwrap();
        assert_eq!(f.folder, std::fs::canonicalize(&blobs).unwrap());
        assert_eq!(f.relocate["m.onnx_data"], "b2");
        assert_eq!(f.relocate["m.onnx_data_1"], "b3");

        // Blobs in sharded sub-folders (blobs/ab/...): the common folder, paths below it.
        std::fs::create_dir_all(blobs.join("aa")).unwrap();
        std::fs::create_dir_all(blobs.join("bb")).unwrap();
        std::fs::write(blobs.join("aa/d1"), b"x").unwrap();
        std::fs::write(blobs.join("bb/d2"), b"x").unwrap();
        std::fs::remove_file(onnx.join("m.onnx_data")).unwrap();
        std::fs::remove_file(onnx.join("m.onnx_data_1")).unwrap();
        std::os::unix::fs::symlink("../../../blobs/aa/d1", onnx.join("m.onnx_data")).unwrap();
        std::os::unix::fs::symlink("../../../blobs/bb/d2", onnx.join("m.onnx_data_1")).unwrap();
        let f = external_data_folder(&onnx.join("m.onnx"), &locs).unwrap();
        assert_eq!(f.folder, std::fs::canonicalize(&blobs).unwrap());
        assert_eq!(f.relocate["m.onnx_data"], "aa/d1");
        assert_eq!(f.relocate["m.onnx_data_1"], "bb/d2");
    }

    #[test]
    fn escapes_are_left_alone_and_missing_files_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("m.onnx"), b"").unwrap();
        let locs: BTreeSet<String> = ["../outside".into(), "/etc/passwd".into()].into();
        let f = external_data_folder(&tmp.path().join("m.onnx"), &locs).unwrap();
        assert!(f.relocate.is_empty());
        let locs: BTreeSet<String> = ["gone.onnx_data".into()].into();
        let e = external_data_folder(&tmp.path().join("m.onnx"), &locs).unwrap_err();
        assert!(e.contains("gone.onnx_data"), "{e}");
    }
}
