//! Where a snapshot's processor settings live, read the way transformers 5 reads them, and the one place
//! that says so.
//!
//! transformers 5 saves a processor as one `processor_config.json`: the processor's own settings at the top
//! (`image_seq_len`, `audio_seq_length`, `patch_size`, …) and each part nested under its attribute name
//! (`"image_processor"`, `"feature_extractor"`, `"video_processor"`); it writes no
//! `preprocessor_config.json`. Older snapshots have a flat `preprocessor_config.json` holding the image
//! processor's and the feature extractor's keys (merged into one object when a model has both). To load a
//! part, transformers takes the nested entry when `processor_config.json` has one and otherwise the flat
//! file — whole objects, never merged key by key (`ImageProcessingMixin.get_image_processor_dict`,
//! `FeatureExtractionMixin.get_feature_extractor_dict` (which also takes an `"audio_processor"` entry),
//! `BaseVideoProcessor.get_video_processor_dict` (which tries `video_preprocessor_config.json` before
//! `preprocessor_config.json`)). The processor's own settings come only from `processor_config.json`
//! (`ProcessorMixin.get_processor_dict`).
//!
//! A setting a family needs that the chosen object does not state is a load error naming the key and both
//! files: transformers saves every attribute of a processor (`to_dict`), so a missing one means a file
//! that was not written by it, and a class default filled in here would be a guess about which class.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::config_util::read_json_opt;
use super::ModelError;
use crate::pipeline::audio::{MelConfig, MelSettingError, MelSettingProblem};
use crate::pipeline::image::Filter;

/// The flat file of older snapshots (transformers' `IMAGE_PROCESSOR_NAME` and `FEATURE_EXTRACTOR_NAME`).
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
/// transformers' `PROCESSOR_NAME`: the processor's own settings, and since transformers 5 its parts.
pub const PROCESSOR_CONFIG: &str = "processor_config.json";
/// transformers' `VIDEO_PROCESSOR_NAME`, tried before [`PREPROCESSOR_CONFIG`] for a video processor.
pub const VIDEO_PREPROCESSOR_CONFIG: &str = "video_preprocessor_config.json";

/// One part of a processor, as transformers names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    ImageProcessor,
    FeatureExtractor,
    VideoProcessor,
}

impl Part {
    /// How errors call it.
    pub fn label(self) -> &'static str {
        match self {
            Self::ImageProcessor => "image processor",
            Self::FeatureExtractor => "feature extractor",
            Self::VideoProcessor => "video processor",
        }
    }

    /// The keys of `processor_config.json` the part may be nested under, in transformers' order.
    fn nested_keys(self) -> &'static [&'static str] {
        match self {
            Self::ImageProcessor => &["image_processor"],
            Self::FeatureExtractor => &["feature_extractor", "audio_processor"],
            Self::VideoProcessor => &["video_processor"],
        }
    }

    /// The flat files tried when there is no nested entry, in transformers' order.
    fn flat_files(self) -> &'static [&'static str] {
        match self {
            Self::ImageProcessor | Self::FeatureExtractor => &[PREPROCESSOR_CONFIG],
            Self::VideoProcessor => &[VIDEO_PREPROCESSOR_CONFIG, PREPROCESSOR_CONFIG],
        }
    }
}

/// Where a part's settings were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `processor_config.json`'s entry of that name.
    Nested(&'static str),
    /// A flat file of that name.
    Flat(&'static str),
    /// In neither.
    Nowhere,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nested(key) => write!(f, "{PROCESSOR_CONFIG} \"{key}\""),
            Self::Flat(file) => f.write_str(file),
            Self::Nowhere => f.write_str("nowhere"),
        }
    }
}

/// The processor files of one snapshot, parsed once.
#[derive(Debug, Clone)]
pub struct ProcessorFiles {
    dir: PathBuf,
    processor: Option<Map<String, Value>>,
    flat: Vec<(&'static str, Map<String, Value>)>,
}

fn object_of(path: &Path, v: Option<Value>) -> Result<Option<Map<String, Value>>, ModelError> {
    match v {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(ModelError::Config(format!(
            "{}: expected a JSON object, found {}",
            path.display(),
            kind_of(&other)
        ))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl ProcessorFiles {
    /// Reads `processor_config.json`, `preprocessor_config.json` and `video_preprocessor_config.json` of
    /// `dir` (each may be absent; a present one must be a JSON object).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let read = |name: &str| {
            let path = dir.join(name);
            object_of(&path, read_json_opt(&path)?)
        };
        let mut flat = Vec::new();
        for name in [PREPROCESSOR_CONFIG, VIDEO_PREPROCESSOR_CONFIG] {
            if let Some(o) = read(name)? {
                flat.push((name, o));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            processor: read(PROCESSOR_CONFIG)?,
            flat,
        })
    }

    /// The settings of `part`: `processor_config.json`'s nested entry when it has one (a `null` entry
    /// counts as none, as in transformers), else the first flat file that exists, else empty (every
    /// setting then reports itself missing).
    pub fn part(&self, part: Part) -> Result<Settings, ModelError> {
        let nested = self.processor.as_ref().and_then(|p| {
            part.nested_keys()
                .iter()
                .find_map(|&k| p.get(k).map(|v| (k, v)))
        });
        let (origin, values) = match nested {
            Some((key, Value::Object(o))) => (Origin::Nested(key), o.clone()),
            Some((key, v)) if !v.is_null() => {
                return Err(ModelError::Config(format!(
                    "{}: {PROCESSOR_CONFIG} \"{key}\" is {}; expected the {} settings as an object",
                    self.dir.display(),
                    kind_of(v),
                    part.label()
                )))
            }
            _ => part
                .flat_files()
                .iter()
                .find_map(|&name| {
                    self.flat
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(n, o)| (Origin::Flat(n), o.clone()))
                })
                .unwrap_or((Origin::Nowhere, Map::new())),
        };
        Ok(Settings {
            dir: self.dir.clone(),
            part,
            origin,
            values,
        })
    }

    /// The processor's own settings: the top level of `processor_config.json` without the nested parts.
    pub fn processor(&self) -> ProcessorSettings {
        let mut values = self.processor.clone().unwrap_or_default();
        for part in [
            Part::ImageProcessor,
            Part::FeatureExtractor,
            Part::VideoProcessor,
        ] {
            for key in part.nested_keys() {
                values.remove(*key);
            }
        }
        ProcessorSettings {
            dir: self.dir.clone(),
            present: self.processor.is_some(),
            values,
        }
    }
}

/// Per-channel `(image_mean, image_std)`.
pub type MeanStd = ([f32; 3], [f32; 3]);

/// "`dir`: `what` setting "`key`" in `source` is `value`: `why`".
fn invalid_setting(
    dir: &Path,
    what: &str,
    source: &dyn fmt::Display,
    values: &Map<String, Value>,
    key: &str,
    why: impl fmt::Display,
) -> ModelError {
    let shown = values
        .get(key)
        .map_or_else(|| "nothing".to_string(), Value::to_string);
    ModelError::Config(format!(
        "{}: {what} setting \"{key}\" in {source} is {shown}: {why}",
        dir.display()
    ))
}

/// One part's settings and where they came from.
#[derive(Debug, Clone)]
pub struct Settings {
    dir: PathBuf,
    part: Part,
    origin: Origin,
    values: Map<String, Value>,
}

/// A size setting (`size`, `crop_size`, `max_image_size`): the fields transformers' `SizeDict` has that the
/// families read. Each is a positive integer when stated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizeSetting {
    pub height: Option<u32>,
    pub width: Option<u32>,
    pub shortest_edge: Option<u32>,
    pub longest_edge: Option<u32>,
}

impl Settings {
    pub fn part(&self) -> Part {
        self.part
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The settings object (empty when found nowhere).
    pub fn values(&self) -> &Map<String, Value> {
        &self.values
    }

    /// The settings as one JSON object, for readers that take a [`Value`].
    pub fn to_value(&self) -> Value {
        Value::Object(self.values.clone())
    }

    /// A stated value (`null` included).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// The error for a setting the chosen object does not state (or states as `null` where a value is
    /// needed): names the key, the object read, and both files with their precedence.
    pub fn missing(&self, key: &str) -> ModelError {
        let nested = self.part.nested_keys()[0];
        let flat = self.part.flat_files().join(" / ");
        let found = match self.origin {
            Origin::Nested(k) => format!("read from {PROCESSOR_CONFIG} \"{k}\""),
            Origin::Flat(f) => {
                format!("read from {f}; {PROCESSOR_CONFIG} has no \"{nested}\" entry")
            }
            Origin::Nowhere => {
                format!("the snapshot has neither {PROCESSOR_CONFIG} \"{nested}\" nor {flat}")
            }
        };
        ModelError::Config(format!(
            "{}: {} setting \"{key}\" is not stated ({found}; transformers reads {PROCESSOR_CONFIG} \"{nested}\" when present, else {flat})",
            self.dir.display(),
            self.part.label(),
        ))
    }

    /// The error for a stated value of the wrong kind or range.
    pub fn invalid(&self, key: &str, why: impl fmt::Display) -> ModelError {
        invalid_setting(
            &self.dir,
            self.part.label(),
            &self.origin,
            &self.values,
            key,
            why,
        )
    }

    /// A stated, non-null value.
    pub fn require(&self, key: &str) -> Result<&Value, ModelError> {
        match self.values.get(key) {
            None | Some(Value::Null) => Err(self.missing(key)),
            Some(v) => Ok(v),
        }
    }

    /// A `do_*` switch. `null` is off: transformers keeps the `None` and tests it for truth when it
    /// processes.
    pub fn flag(&self, key: &str) -> Result<bool, ModelError> {
        match self.values.get(key) {
            None => Err(self.missing(key)),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.invalid(key, "expected true or false")),
        }
    }

    /// A number.
    pub fn number(&self, key: &str) -> Result<f64, ModelError> {
        self.require(key)?
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.invalid(key, "expected a number"))
    }

    /// A positive integer.
    pub fn positive(&self, key: &str) -> Result<usize, ModelError> {
        self.require(key)?
            .as_u64()
            .filter(|&x| x > 0 && x <= u32::MAX as u64)
            .map(|x| x as usize)
            .ok_or_else(|| self.invalid(key, "expected a positive integer"))
    }

    /// A per-channel value: one number for all three channels, or a list of 1 or 3 numbers.
    pub fn per_channel(&self, key: &str) -> Result<[f32; 3], ModelError> {
        let bad = || self.invalid(key, "expected a number or a list of 3 numbers");
        let num = |v: &Value| v.as_f64().filter(|x| x.is_finite()).map(|x| x as f32);
        match self.require(key)? {
            Value::Array(a) if a.len() == 3 => {
                let mut out = [0f32; 3];
                for (o, v) in out.iter_mut().zip(a) {
                    *o = num(v).ok_or_else(bad)?;
                }
                Ok(out)
            }
            Value::Array(a) if a.len() == 1 => Ok([num(&a[0]).ok_or_else(bad)?; 3]),
            v => num(v).map(|x| [x; 3]).ok_or_else(bad),
        }
    }

    /// A size object (`{"height", "width"}`, `{"shortest_edge"}`, `{"longest_edge"}`, …).
    pub fn size(&self, key: &str) -> Result<SizeSetting, ModelError> {
        let obj = self
            .require(key)?
            .as_object()
            .ok_or_else(|| self.invalid(key, "expected an object"))?;
        let field = |k: &str| -> Result<Option<u32>, ModelError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&x| x > 0 && x <= u32::MAX as u64)
                    .map(|x| Some(x as u32))
                    .ok_or_else(|| self.invalid(key, format!("{k} must be a positive integer"))),
            }
        };
        Ok(SizeSetting {
            height: field("height")?,
            width: field("width")?,
            shortest_edge: field("shortest_edge")?,
            longest_edge: field("longest_edge")?,
        })
    }

    /// `resample` as one of the Pillow filters the image stage implements.
    pub fn resample(&self) -> Result<Filter, ModelError> {
        let code = self
            .require("resample")?
            .as_u64()
            .ok_or_else(|| self.invalid("resample", "expected a PIL resampling number"))?;
        Filter::from_pil(code).ok_or_else(|| {
            self.invalid(
                "resample",
                "unsupported (supported: 1 LANCZOS, 2 BILINEAR, 3 BICUBIC)",
            )
        })
    }

    /// `rescale_factor` when `do_rescale` is on.
    pub fn rescale(&self) -> Result<Option<f64>, ModelError> {
        if self.flag("do_rescale")? {
            Ok(Some(self.number("rescale_factor")?))
        } else {
            Ok(None)
        }
    }

    /// The log-mel front end of a feature extractor: these settings over `base` (the extractor class's
    /// behaviour, which no file states), every saved key required
    /// ([`MelConfig::from_extractor_settings`]).
    pub fn mel(&self, base: MelConfig) -> Result<MelConfig, ModelError> {
        MelConfig::from_extractor_settings(&self.to_value(), base).map_err(
            |MelSettingError { key, problem }| match problem {
                MelSettingProblem::Missing => self.missing(key),
                MelSettingProblem::Invalid(why) => self.invalid(key, why),
            },
        )
    }

    /// `(image_mean, image_std)` when `do_normalize` is on; a zero deviation is refused.
    pub fn normalize(&self) -> Result<Option<MeanStd>, ModelError> {
        if !self.flag("do_normalize")? {
            return Ok(None);
        }
        let mean = self.per_channel("image_mean")?;
        let std = self.per_channel("image_std")?;
        if std.contains(&0.0) {
            return Err(self.invalid("image_std", "a channel's deviation is 0"));
        }
        Ok(Some((mean, std)))
    }
}

#[cfg(test)]
impl Settings {
    /// Settings as a flat `preprocessor_config.json` holding `v` would give them (unit tests).
    pub fn flat_for_test(part: Part, v: Value) -> Self {
        Self {
            dir: PathBuf::from("<test>"),
            part,
            origin: Origin::Flat(PREPROCESSOR_CONFIG),
            values: v.as_object().cloned().unwrap_or_default(),
        }
    }
}

/// The processor's own settings (the top level of `processor_config.json`).
#[derive(Debug, Clone)]
pub struct ProcessorSettings {
    dir: PathBuf,
    present: bool,
    values: Map<String, Value>,
}

impl ProcessorSettings {
    /// A stated value (`null` included).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// The error for a processor setting that is not stated.
    pub fn missing(&self, key: &str) -> ModelError {
        let why = if self.present {
            "it is not stated"
        } else {
            "the snapshot has none"
        };
        ModelError::Config(format!(
            "{}: processor setting \"{key}\" is needed from {PROCESSOR_CONFIG} and {why} (transformers reads a processor's own settings only from that file; {PREPROCESSOR_CONFIG} holds its parts)",
            self.dir.display()
        ))
    }

    /// The error for a stated value of the wrong kind or range.
    pub fn invalid(&self, key: &str, why: impl fmt::Display) -> ModelError {
        invalid_setting(
            &self.dir,
            "processor",
            &PROCESSOR_CONFIG,
            &self.values,
            key,
            why,
        )
    }

    /// A stated positive integer.
    pub fn positive(&self, key: &str) -> Result<usize, ModelError> {
        match self.values.get(key) {
            None | Some(Value::Null) => Err(self.missing(key)),
            Some(v) => v
                .as_u64()
                .filter(|&x| x > 0 && x <= u32::MAX as u64)
                .map(|x| x as usize)
                .ok_or_else(|| self.invalid(key, "expected a positive integer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }

    fn image(dir: &Path) -> Settings {
        ProcessorFiles::load(dir)
            .unwrap()
            .part(Part::ImageProcessor)
            .unwrap()
    }

    #[test]
    fn flat_only() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            PREPROCESSOR_CONFIG,
            json!({"size": {"height": 64, "width": 64}, "frame_length": 320}),
        );
        write(dir.path(), PROCESSOR_CONFIG, json!({"image_seq_len": 64}));
        let files = ProcessorFiles::load(dir.path()).unwrap();
        let s = files.part(Part::ImageProcessor).unwrap();
        assert_eq!(s.origin(), Origin::Flat(PREPROCESSOR_CONFIG));
        assert_eq!(s.size("size").unwrap().height, Some(64));
        // Older snapshots merge both parts into the one flat file.
        let fe = files.part(Part::FeatureExtractor).unwrap();
        assert_eq!(fe.origin(), Origin::Flat(PREPROCESSOR_CONFIG));
        assert_eq!(fe.positive("frame_length").unwrap(), 320);
        assert_eq!(files.processor().positive("image_seq_len").unwrap(), 64);
    }

    #[test]
    fn nested_only() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            json!({"image_seq_length": 280,
                   "image_processor": {"patch_size": 16},
                   "audio_processor": {"frame_length": 320},
                   "video_processor": {"num_frames": 32}}),
        );
        let files = ProcessorFiles::load(dir.path()).unwrap();
        let s = files.part(Part::ImageProcessor).unwrap();
        assert_eq!(s.origin(), Origin::Nested("image_processor"));
        assert_eq!(s.positive("patch_size").unwrap(), 16);
        let fe = files.part(Part::FeatureExtractor).unwrap();
        assert_eq!(fe.origin(), Origin::Nested("audio_processor"));
        let v = files.part(Part::VideoProcessor).unwrap();
        assert_eq!(v.positive("num_frames").unwrap(), 32);
        // The processor's own settings leave the parts out.
        let p = files.processor();
        assert_eq!(p.positive("image_seq_length").unwrap(), 280);
        assert!(p.get("image_processor").is_none());
    }

    #[test]
    fn nested_wins_over_flat_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            PREPROCESSOR_CONFIG,
            json!({"patch_size": 14, "resample": 2, "frame_length": 400}),
        );
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            json!({"image_processor": {"patch_size": 16},
                   "feature_extractor": {"frame_length": 320},
                   "audio_processor": {"frame_length": 999}}),
        );
        let s = image(dir.path());
        assert_eq!(s.positive("patch_size").unwrap(), 16);
        // Not merged key by key: the flat file's resample is not read.
        let e = s.resample().unwrap_err().to_string();
        assert!(
            e.contains("\"resample\"") && e.contains("processor_config.json \"image_processor\"")
        );
        assert!(e.contains(PREPROCESSOR_CONFIG), "{e}");
        // feature_extractor before audio_processor.
        let fe = ProcessorFiles::load(dir.path())
            .unwrap()
            .part(Part::FeatureExtractor)
            .unwrap();
        assert_eq!(fe.positive("frame_length").unwrap(), 320);
        // A null entry counts as none.
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            json!({"image_processor": null}),
        );
        assert_eq!(image(dir.path()).positive("patch_size").unwrap(), 14);
        write(
            dir.path(),
            PROCESSOR_CONFIG,
            json!({"image_processor": [1]}),
        );
        let e = ProcessorFiles::load(dir.path())
            .unwrap()
            .part(Part::ImageProcessor)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a list"), "{e}");
    }

    #[test]
    fn neither_names_the_key_and_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = image(dir.path());
        assert_eq!(s.origin(), Origin::Nowhere);
        let e = s.size("crop_size").unwrap_err().to_string();
        for want in [
            "\"crop_size\"",
            PREPROCESSOR_CONFIG,
            "processor_config.json \"image_processor\"",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
        let e = ProcessorFiles::load(dir.path())
            .unwrap()
            .processor()
            .positive("image_seq_len")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"image_seq_len\"") && e.contains(PROCESSOR_CONFIG),
            "{e}"
        );
        // Flat file present but without the key: the message says the nested entry is absent.
        write(dir.path(), PREPROCESSOR_CONFIG, json!({"do_resize": true}));
        let e = image(dir.path())
            .flag("do_normalize")
            .unwrap_err()
            .to_string();
        assert!(e.contains("read from preprocessor_config.json"), "{e}");
        assert!(
            e.contains("processor_config.json \"image_processor\""),
            "{e}"
        );
    }

    #[test]
    fn typed_values() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            PREPROCESSOR_CONFIG,
            json!({"do_rescale": true, "rescale_factor": 0.5, "do_normalize": true,
                   "image_mean": 0.5, "image_std": [0.1, 0.2, 0.3], "do_convert_rgb": null,
                   "resample": 7, "size": {"shortest_edge": 0}, "bad_flag": 1}),
        );
        let s = image(dir.path());
        assert_eq!(s.rescale().unwrap(), Some(0.5));
        assert_eq!(s.normalize().unwrap(), Some(([0.5; 3], [0.1, 0.2, 0.3])));
        assert!(!s.flag("do_convert_rgb").unwrap());
        assert!(s.flag("bad_flag").is_err());
        assert!(s
            .resample()
            .unwrap_err()
            .to_string()
            .contains("unsupported"));
        assert!(s
            .size("size")
            .unwrap_err()
            .to_string()
            .contains("shortest_edge"));
        write(
            dir.path(),
            PREPROCESSOR_CONFIG,
            json!({"do_normalize": true, "image_mean": [0, 0, 0], "image_std": [1, 0, 1]}),
        );
        let e = image(dir.path()).normalize().unwrap_err().to_string();
        assert!(e.contains("image_std"), "{e}");
        write(dir.path(), PREPROCESSOR_CONFIG, json!([1, 2]));
        assert!(ProcessorFiles::load(dir.path()).is_err());
    }
}
