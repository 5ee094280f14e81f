//! Which chat template and which special tokens a snapshot directory gives its chat template,
//! following what transformers 5 reads when the model's processor renders a chat (every family we
//! serve is multimodal, so `processor.apply_chat_template` is the reference), and the tokenizer's
//! own rules where the processor has none. Read from transformers 5.24 and 4.57:
//!
//! Template (`ProcessorMixin.get_processor_dict`, `ProcessorMixin._resolve_chat_template`; the
//! tokenizer's `PreTrainedTokenizerBase._from_pretrained` and `get_chat_template`):
//! 1. `processor_config.json` `"chat_template"` (a warning in transformers, which wants the template
//!    in its own file, but v5 takes it over the files; 4.57 let the files win);
//! 2. `chat_template.json` `{"chat_template": ...}`, the processor's legacy file: it wins over
//!    `chat_template.jinja`, it must have the key, and it may not come with
//!    `additional_chat_templates/` (transformers refuses the combination);
//! 3. `chat_template.jinja`, the template named "default", then `additional_chat_templates/*.jinja`,
//!    one named template per file (the file stem): `default.jinja` there is the default when there is
//!    no `chat_template.jinja`, and named files without any default are an error (the processor
//!    and the tokenizer both refuse to guess);
//! 4. `tokenizer_config.json` `"chat_template"`, the tokenizer's template (a string, or a list of
//!    `{"name", "template"}` from which "default" is taken, else an error). transformers' processor
//!    would have no template here; we serve what `tokenizer.apply_chat_template` would render.
//!
//! Of named templates only "default" is ever used: the processor never picks another (the
//! tokenizer's `get_chat_template` switches to "tool_use" when given tools; a processor does not).
//!
//! Special tokens (`PreTrainedTokenizerBase._from_pretrained`, `__init__`, `special_tokens_map`,
//! `_set_model_specific_special_tokens`): the template sees the tokenizer's `special_tokens_map`,
//! which in v5 is the seven named tokens (bos, eos, unk, sep, pad, cls, mask) plus the
//! model-specific named ones (`image_token`, `boi_token`, ...: every other `*_token` key of
//! `tokenizer_config.json` with a string or `AddedToken` value, and the entries of an
//! `extra_special_tokens` object). `special_tokens_map.json` is legacy: read only when
//! `tokenizer_config.json` has no `added_tokens_decoder` (v4.57 and v5 alike), and then its named
//! tokens override the config's. Lists (`additional_special_tokens`, v5's list-valued
//! `extra_special_tokens`) never reach the template in v5 (v4 passed `additional_special_tokens`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{SpecialTokens, TemplateError};

/// Where [`load`] looks for a template, in the order it tries them.
pub const TEMPLATE_SOURCES: &str = "processor_config.json \"chat_template\", chat_template.json, \
     chat_template.jinja, additional_chat_templates/default.jinja, \
     tokenizer_config.json \"chat_template\"";

/// transformers 5's `SPECIAL_TOKENS_ATTRIBUTES`, the named tokens every tokenizer has.
const NAMED_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

const ADDITIONAL_DIR: &str = "additional_chat_templates";

/// The template source and the special tokens of snapshot `dir`; `Ok(None)`: no template at all.
pub fn load(dir: &Path) -> Result<Option<(String, SpecialTokens)>, TemplateError> {
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    // transformers reads the legacy map only when the config has no `added_tokens_decoder`.
    let legacy_map = match &config {
        Some(c) if c.get("added_tokens_decoder").is_some() => None,
        _ => read_json(&dir.join("special_tokens_map.json"))?,
    };
    let tokens = special_tokens(config.as_ref(), legacy_map.as_ref())?;
    let source = match processor_template(dir)? {
        Some(source) => Some(source),
        None => match config.as_ref().and_then(|c| non_null(c, "chat_template")) {
            Some(v) => Some(pick_default(v, "tokenizer_config.json")?),
            None => None,
        },
    };
    Ok(source.map(|s| (s, tokens)))
}

/// Rules 1–3 of the module doc: the template the processor would load.
fn processor_template(dir: &Path) -> Result<Option<String>, TemplateError> {
    let named = additional_templates(dir)?;
    let legacy_path = dir.join("chat_template.json");
    let legacy = match read_json(&legacy_path)? {
        None => None,
        Some(_) if !named.is_empty() => {
            return Err(TemplateError::Compile(format!(
                "{} comes with {ADDITIONAL_DIR}/, which transformers refuses: replace the legacy \
                 chat_template.json with chat_template.jinja",
                legacy_path.display()
            )))
        }
        Some(json) => Some(non_null(&json, "chat_template").cloned().ok_or_else(|| {
            TemplateError::Compile(format!(
                "{} has no \"chat_template\" entry",
                legacy_path.display()
            ))
        })?),
    };
    if let Some(processor) = read_json(&dir.join("processor_config.json"))? {
        if let Some(v) = non_null(&processor, "chat_template") {
            return pick_default(v, "processor_config.json").map(Some);
        }
    }
    if let Some(v) = legacy {
        return pick_default(&v, "chat_template.json").map(Some);
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return read_text(&jinja).map(Some);
    }
    if let Some(default) = named.get("default") {
        return read_text(default).map(Some);
    }
    if !named.is_empty() {
        let names: Vec<&str> = named.keys().map(String::as_str).collect();
        return Err(TemplateError::Compile(format!(
            "{} has named chat templates ({}) in {ADDITIONAL_DIR}/ but no default one \
             (chat_template.jinja or {ADDITIONAL_DIR}/default.jinja)",
            dir.display(),
            names.join(", ")
        )));
    }
    Ok(None)
}

/// `additional_chat_templates/*.jinja` by name (the file stem).
fn additional_templates(dir: &Path) -> Result<BTreeMap<String, PathBuf>, TemplateError> {
    let folder = dir.join(ADDITIONAL_DIR);
    let mut named = BTreeMap::new();
    if !folder.is_dir() {
        return Ok(named);
    }
    let entries = std::fs::read_dir(&folder)
        .map_err(|e| TemplateError::Compile(format!("{}: {e}", folder.display())))?;
    for entry in entries {
        let path = entry
            .map_err(|e| TemplateError::Compile(format!("{}: {e}", folder.display())))?
            .path();
        let name = path.file_name().and_then(|n| n.to_str());
        if let Some(stem) = name.and_then(|n| n.strip_suffix(".jinja")) {
            named.insert(stem.to_owned(), path.clone());
        }
    }
    Ok(named)
}

/// A template entry: a string, or named templates (`[{"name", "template"}]`, or a name → template
/// object) of which "default" is taken; anything else, or no "default", is an error naming `file`.
fn pick_default(v: &Value, file: &str) -> Result<String, TemplateError> {
    let bad = || {
        TemplateError::Compile(format!(
            "{file}: \"chat_template\" must be a string or a list of {{\"name\", \"template\"}}"
        ))
    };
    let named: Vec<(&str, &Value)> = match v {
        Value::String(s) => return Ok(s.clone()),
        Value::Array(entries) => entries
            .iter()
            .map(|e| match (e.get("name"), e.get("template")) {
                (Some(Value::String(n)), Some(t)) => Ok((n.as_str(), t)),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        Value::Object(map) => map.iter().map(|(n, t)| (n.as_str(), t)).collect(),
        _ => return Err(bad()),
    };
    match named.iter().find(|(n, _)| *n == "default") {
        Some((_, Value::String(t))) => Ok(t.clone()),
        Some(_) => Err(bad()),
        None => {
            let names: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
            Err(TemplateError::Compile(format!(
                "{file} has named chat templates ({}) but none named \"default\"",
                names.join(", ")
            )))
        }
    }
}

/// The tokens the template sees (module doc). `legacy_map` is `special_tokens_map.json` when
/// transformers would read it.
pub(super) fn special_tokens(
    config: Option<&Value>,
    legacy_map: Option<&Value>,
) -> Result<SpecialTokens, TemplateError> {
    let empty = serde_json::Map::new();
    let config = config.and_then(Value::as_object).unwrap_or(&empty);
    let legacy = legacy_map.and_then(Value::as_object).unwrap_or(&empty);

    // The named tokens: the legacy map's entry (even `null`) replaces the config's.
    let mut named = BTreeMap::new();
    for key in NAMED_TOKENS {
        let (file, value) = match legacy.get(key) {
            Some(v) => ("special_tokens_map.json", v),
            None => match config.get(key) {
                Some(v) => ("tokenizer_config.json", v),
                None => continue,
            },
        };
        if let Some(text) = token_text(value, file, key)? {
            named.insert(key, text);
        }
    }

    // Model-specific tokens. `_from_pretrained` takes the config's plain-string `*_token` entries
    // and `extra_special_tokens` objects (config's, then the legacy map's) as explicit; `__init__`
    // later collects the remaining `*_token` kwargs (the config's serialized `AddedToken`s, and
    // whatever the legacy map set) as automatic ones, and explicit entries win.
    let is_model_specific = |k: &str| k.ends_with("_token") && !NAMED_TOKENS.contains(&k);
    let mut automatic = BTreeMap::new();
    for (key, value) in config.iter().filter(|(k, _)| is_model_specific(k)) {
        if is_serialized_added_token(value) && !legacy.contains_key(key) {
            if let Some(text) = token_text(value, "tokenizer_config.json", key)? {
                automatic.insert(key.clone(), text);
            }
        }
    }
    for (key, value) in legacy.iter().filter(|(k, _)| is_model_specific(k)) {
        // `__init__` only collects strings and `AddedToken`s; it leaves other values alone.
        if value.is_string() || value.get("content").is_some_and(Value::is_string) {
            if let Some(text) = token_text(value, "special_tokens_map.json", key)? {
                automatic.insert(key.clone(), text);
            }
        }
    }
    let mut explicit = BTreeMap::new();
    for (key, value) in config.iter().filter(|(k, _)| is_model_specific(k)) {
        if let Value::String(s) = value {
            explicit.insert(key.clone(), s.clone());
        }
    }
    for (file, map) in [
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", legacy),
    ] {
        if let Some(Value::Object(extra)) = map.get("extra_special_tokens") {
            for (key, value) in extra {
                if let Some(text) = token_text(value, file, key)? {
                    explicit.insert(key.clone(), text);
                }
            }
        }
    }
    automatic.extend(explicit);

    let mut take = |key: &str| named.remove(key);
    let (bos_token, eos_token) = (take("bos_token"), take("eos_token"));
    let (pad_token, unk_token) = (take("pad_token"), take("unk_token"));
    let mut other: BTreeMap<String, String> =
        named.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    other.extend(automatic);
    Ok(SpecialTokens {
        bos_token,
        eos_token,
        pad_token,
        unk_token,
        other,
    })
}

/// A token's text: a string, or a serialized `AddedToken` (`{"content": ...}`, with or without
/// the `"__type"` marker transformers writes); `null` is no token; anything else is an error, as
/// transformers refuses to load it.
fn token_text(v: &Value, file: &str, key: &str) -> Result<Option<String>, TemplateError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TemplateError::Compile(format!(
                "{file}: {key} is an object without a \"content\" string"
            ))),
        },
        _ => Err(TemplateError::Compile(format!(
            "{file}: {key} must be a string or an AddedToken object"
        ))),
    }
}

fn is_serialized_added_token(v: &Value) -> bool {
    v.get("__type").and_then(Value::as_str) == Some("AddedToken")
}

fn non_null<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|v| !v.is_null())
}

fn read_text(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path)
        .map_err(|e| TemplateError::Compile(format!("{}: {e}", path.display())))
}

/// `Ok(None)` when the file does not exist; a present but broken file is an error, since
/// silently falling back to another template would produce subtly wrong prompts.
fn read_json(path: &Path) -> Result<Option<Value>, TemplateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TemplateError::Compile(format!("{}: {e}", path.display()))),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TemplateError::Compile(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A snapshot directory written file by file (`Value`s as JSON, `&str`s verbatim).
    struct Snapshot(tempfile::TempDir);

    impl Snapshot {
        fn new() -> Self {
            Snapshot(tempfile::tempdir().unwrap())
        }

        fn with(self, name: &str, content: impl Into<FileContent>) -> Self {
            let path = self.0.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let text = match content.into() {
                FileContent::Json(v) => serde_json::to_string_pretty(&v).unwrap(),
                FileContent::Text(t) => t,
            };
            std::fs::write(path, text).unwrap();
            self
        }

        fn load(&self) -> Result<Option<(String, SpecialTokens)>, TemplateError> {
            load(self.0.path())
        }

        fn template(&self) -> String {
            self.load().unwrap().expect("a template").0
        }

        fn tokens(&self) -> SpecialTokens {
            self.load().unwrap().expect("a template").1
        }

        fn error(&self) -> String {
            match self.load() {
                Err(e) => e.to_string(),
                Ok(found) => panic!("expected an error, got {found:?}"),
            }
        }
    }

    enum FileContent {
        Json(Value),
        Text(String),
    }

    impl From<Value> for FileContent {
        fn from(v: Value) -> Self {
            FileContent::Json(v)
        }
    }

    impl From<&str> for FileContent {
        fn from(t: &str) -> Self {
            FileContent::Text(t.to_owned())
        }
    }

    fn other(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn transformers5_save_jinja_and_config_without_special_tokens_map() {
        // What `save_pretrained` writes in v5: the template in its own file, none in the config,
        // the model-specific tokens as an `extra_special_tokens` object, no special_tokens_map.json.
        let snap = Snapshot::new()
            .with("chat_template.jinja", "{{ bos_token }}J")
            .with(
                "tokenizer_config.json",
                json!({
                    "backend": "tokenizers", "tokenizer_class": "GemmaTokenizer",
                    "add_bos_token": true, "bos_token": "<bos>", "eos_token": "<eos>",
                    "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
                    "extra_special_tokens": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>"},
                }),
            );
        let (source, tokens) = snap.load().unwrap().unwrap();
        assert_eq!(source, "{{ bos_token }}J");
        assert_eq!(
            tokens,
            SpecialTokens {
                bos_token: Some("<bos>".into()),
                eos_token: Some("<eos>".into()),
                pad_token: Some("<pad>".into()),
                unk_token: Some("<unk>".into()),
                other: other(&[
                    ("boi_token", "<start_of_image>"),
                    ("image_token", "<image_soft_token>"),
                    ("mask_token", "<mask>"),
                ]),
            }
        );
    }

    #[test]
    fn transformers4_special_tokens_map_overrides_config_unless_added_tokens_decoder() {
        let config = json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>", "pad_token": null,
            "additional_special_tokens": ["<extra>"],
            "chat_template": "C",
        });
        let map = json!({
            "bos_token": {"content": "<s>", "lstrip": false, "special": true},
            "eos_token": "<|end|>", "sep_token": "<sep>",
            "additional_special_tokens": ["<extra>"],
        });
        let snap = Snapshot::new()
            .with("tokenizer_config.json", config.clone())
            .with("special_tokens_map.json", map);
        let tokens = snap.tokens();
        assert_eq!(tokens.bos_token.as_deref(), Some("<s>"));
        assert_eq!(tokens.eos_token.as_deref(), Some("<|end|>"));
        assert_eq!(tokens.pad_token, None);
        // Lists never reach the template in transformers 5.
        assert_eq!(tokens.other, other(&[("sep_token", "<sep>")]));

        // A config with `added_tokens_decoder` (what 4.34+ writes) makes the map dead weight:
        // transformers does not even open it.
        let mut config = config;
        config["added_tokens_decoder"] = json!({"1": {"content": "<s>", "special": true}});
        let snap = Snapshot::new()
            .with("tokenizer_config.json", config)
            .with("special_tokens_map.json", "{not json");
        let tokens = snap.tokens();
        assert_eq!(tokens.eos_token.as_deref(), Some("</s>"));
        assert!(tokens.other.is_empty(), "{tokens:?}");
    }

    #[test]
    fn special_tokens_map_alone_gives_the_tokens() {
        let snap = Snapshot::new()
            .with("chat_template.jinja", "J")
            .with("special_tokens_map.json", json!({"eos_token": "<e>"}));
        assert_eq!(snap.tokens().eos_token.as_deref(), Some("<e>"));
    }

    #[test]
    fn model_specific_tokens_follow_transformers5() {
        // Checked against transformers 5.24's `special_tokens_map` for the same files.
        let config = json!({
            "bos_token": "<bos>", "eos_token": "<eos>", "mask_token": "<mask>", "pad_token": null,
            "image_token": "<img>",
            "boi_token": {"__type": "AddedToken", "content": "<boi>", "special": true},
            "foo_token": {"content": "<x>"},
            "add_bos_token": true,
            "extra_special_tokens": {"audio_token": "<aud>"},
            "additional_special_tokens": ["<a1>"],
        });
        let tokens = special_tokens(Some(&config), None).unwrap();
        assert_eq!(
            tokens.other,
            other(&[
                ("audio_token", "<aud>"),
                ("boi_token", "<boi>"),
                ("image_token", "<img>"),
                ("mask_token", "<mask>"),
            ])
        );
        // The legacy map sets named tokens outright, but a model-specific one only where the
        // config has no plain string for it; its `extra_special_tokens` object wins over both.
        let map = json!({
            "image_token": "<img2>", "boi_token": "<boi2>", "eoi_token": "<eoi2>",
            "extra_special_tokens": {"audio_token": "<aud2>"},
        });
        let tokens = special_tokens(Some(&config), Some(&map)).unwrap();
        assert_eq!(
            tokens.other,
            other(&[
                ("audio_token", "<aud2>"),
                ("boi_token", "<boi2>"),
                ("eoi_token", "<eoi2>"),
                ("image_token", "<img>"),
                ("mask_token", "<mask>"),
            ])
        );
    }

    #[test]
    fn malformed_named_token_is_a_load_error() {
        let snap = Snapshot::new()
            .with("chat_template.jinja", "J")
            .with("tokenizer_config.json", json!({"bos_token": 5}));
        let err = snap.error();
        assert!(err.contains("tokenizer_config.json: bos_token"), "{err}");
        let snap = Snapshot::new().with("chat_template.jinja", "J").with(
            "tokenizer_config.json",
            json!({"eos_token": {"lstrip": true}}),
        );
        assert!(snap.error().contains("eos_token"));
    }

    #[test]
    fn processor_files_win_over_the_tokenizer_config() {
        let config = json!({"bos_token": "<bos>", "chat_template": "C"});
        let snap = Snapshot::new().with("tokenizer_config.json", config);
        assert_eq!(snap.template(), "C");
        let snap = snap.with("chat_template.jinja", "F");
        assert_eq!(snap.template(), "F");
        // The processor's legacy file wins over chat_template.jinja (`get_processor_dict`).
        let snap = snap.with("chat_template.json", json!({"chat_template": "J"}));
        assert_eq!(snap.template(), "J");
        // And processor_config.json's own entry wins over both in transformers 5.
        let snap = snap.with("processor_config.json", json!({"chat_template": "P"}));
        assert_eq!(snap.template(), "P");
        let snap = snap.with("processor_config.json", json!({"chat_template": null}));
        assert_eq!(snap.template(), "J");
        assert_eq!(snap.tokens().bos_token.as_deref(), Some("<bos>"));
    }

    #[test]
    fn additional_chat_templates_folder() {
        let snap = Snapshot::new()
            .with("chat_template.jinja", "F")
            .with("additional_chat_templates/tool_use.jinja", "T");
        assert_eq!(snap.template(), "F");

        let snap = Snapshot::new()
            .with("additional_chat_templates/default.jinja", "D")
            .with("additional_chat_templates/tool_use.jinja", "T")
            .with("additional_chat_templates/README.md", "not a template");
        assert_eq!(snap.template(), "D");

        // Named templates but no default: transformers refuses to pick one, even when the
        // tokenizer config has a template (the files replace it).
        let snap = Snapshot::new()
            .with("additional_chat_templates/tool_use.jinja", "T")
            .with("additional_chat_templates/rag.jinja", "R")
            .with("tokenizer_config.json", json!({"chat_template": "C"}));
        let err = snap.error();
        assert!(
            err.contains("(rag, tool_use)") && err.contains("no default"),
            "{err}"
        );

        // The legacy chat_template.json cannot be combined with the folder.
        let snap = Snapshot::new()
            .with("chat_template.json", json!({"chat_template": "J"}))
            .with("additional_chat_templates/tool_use.jinja", "T");
        assert!(snap.error().contains("replace the legacy"));
    }

    #[test]
    fn named_templates_take_default_or_fail() {
        let named = |entries: Value| {
            Snapshot::new().with("tokenizer_config.json", json!({"chat_template": entries}))
        };
        let snap = named(json!([
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}
        ]));
        assert_eq!(snap.template(), "D");
        // Before, the first entry was taken; transformers raises instead.
        let err =
            named(json!([{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]))
                .error();
        assert!(
            err.contains("tokenizer_config.json has named chat templates (tool_use, rag)"),
            "{err}"
        );
        let err = named(json!(42)).error();
        assert!(err.contains("must be a string"), "{err}");
        let snap = Snapshot::new().with(
            "chat_template.json",
            json!({"chat_template": [{"name": "default", "template": "D"}]}),
        );
        assert_eq!(snap.template(), "D");
    }

    #[test]
    fn missing_or_broken_files() {
        let snap = Snapshot::new();
        assert!(snap.load().unwrap().is_none());
        let snap = snap.with("tokenizer_config.json", json!({"bos_token": "<bos>"}));
        assert!(snap.load().unwrap().is_none());
        let snap = snap.with("chat_template.json", json!({"template": "J"}));
        assert!(snap.error().contains("has no \"chat_template\" entry"));
        let snap = Snapshot::new()
            .with("chat_template.jinja", "F")
            .with("tokenizer_config.json", "{not json");
        assert!(snap.error().contains("tokenizer_config.json"));
        let snap = Snapshot::new()
            .with("chat_template.jinja", "F")
            .with("processor_config.json", "{not json");
        assert!(snap.error().contains("processor_config.json"));
        for name in [
            "processor_config.json",
            "chat_template.json",
            "chat_template.jinja",
            "additional_chat_templates/default.jinja",
            "tokenizer_config.json",
        ] {
            assert!(TEMPLATE_SOURCES.contains(name), "{name}");
        }
    }

    #[test]
    fn committed_fixtures_match_transformers5() {
        // transformers 5.24: `AutoTokenizer.from_pretrained(dir).special_tokens_map` and
        // `ProcessorMixin.get_processor_dict(dir)`'s template. Gemma's `mask_token` ("<mask>") is a
        // `GemmaTokenizer.__init__` default the gemma3n files never state: not reproduced.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let gemma = |image: &str, boi: &str, eoi: &str, audio: &str, boa: &str, eoa: &str| {
            other(&[
                ("audio_token", audio),
                ("boa_token", boa),
                ("boi_token", boi),
                ("eoa_token", eoa),
                ("eoi_token", eoi),
                ("image_token", image),
            ])
        };
        let cases = [
            (
                "tiny-gemma3n",
                "chat_template.jinja",
                ["<bos>", "<eos>", "<pad>", "<unk>"],
                gemma(
                    "<image_soft_token>",
                    "<start_of_image>",
                    "<end_of_image>",
                    "<audio_soft_token>",
                    "<start_of_audio>",
                    "<end_of_audio>",
                ),
            ),
            (
                "tiny-gemma4",
                "chat_template.jinja",
                ["<bos>", "<eos>", "<pad>", "<unk>"],
                {
                    let mut o = gemma(
                        "<|image|>",
                        "<|image>",
                        "<image|>",
                        "<|audio|>",
                        "<|audio>",
                        "<audio|>",
                    );
                    o.insert("mask_token".into(), "<mask>".into());
                    o
                },
            ),
            (
                "tiny-smolvlm",
                "chat_template.json",
                [
                    "<|im_start|>",
                    "<end_of_utterance>",
                    "<|im_end|>",
                    "<|endoftext|>",
                ],
                BTreeMap::new(),
            ),
            (
                "tiny-granite-vision",
                "chat_template.json",
                ["<|end_of_text|>"; 4],
                BTreeMap::new(),
            ),
        ];
        for (name, template_file, [bos, eos, pad, unk], other) in cases {
            let dir = root.join(name);
            let (source, tokens) = load(&dir).unwrap().unwrap();
            let expected = match template_file {
                "chat_template.json" => {
                    let json = read_json(&dir.join(template_file)).unwrap().unwrap();
                    json["chat_template"].as_str().unwrap().to_owned()
                }
                _ => std::fs::read_to_string(dir.join(template_file)).unwrap(),
            };
            assert!(
                source == expected,
                "{name}: template not from {template_file}"
            );
            let want = SpecialTokens {
                bos_token: Some(bos.into()),
                eos_token: Some(eos.into()),
                pad_token: Some(pad.into()),
                unk_token: Some(unk.into()),
                other,
            };
            assert_eq!(tokens, want, "{name}");
        }
    }
}
