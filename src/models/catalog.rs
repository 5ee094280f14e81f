//! Model families, the display names users of the original Python server know, and quantization
//! names → per-component ONNX file suffixes (model_interface.md §1.1, §4).

use std::fmt;

use super::family::{FamilySpec, LoadFn};

/// A model family: which graphs it has and how its files are named (its folder's [`FamilySpec`],
/// listed in [`super::registry`]). Chosen from `config.json`'s `model_type`, never from the model's name.
#[derive(Clone, Copy)]
pub struct Family(&'static FamilySpec);

impl PartialEq for Family {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Family {}

impl std::hash::Hash for Family {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.name.hash(h)
    }
}

impl fmt::Debug for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

impl Family {
    pub const fn of(spec: &'static FamilySpec) -> Self {
        Self(spec)
    }

    /// Every registered family.
    pub fn all() -> impl Iterator<Item = Family> {
        super::registry::FAMILIES.iter().map(|s| Family(s))
    }

    pub fn by_name(name: &str) -> Option<Self> {
        Self::all().find(|f| f.name() == name)
    }

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::all().find(|f| f.model_types().contains(&model_type))
    }

    /// The `config.json` model types that select this family.
    pub fn model_types(self) -> &'static [&'static str] {
        self.0.model_types
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// The graphs of this family, required ones first.
    pub fn components(self) -> &'static [Component] {
        self.0.components
    }

    pub fn default_quant(self) -> Quant {
        self.0.quants[0]
    }

    /// The quantization names this family accepts.
    pub fn quants(self) -> &'static [Quant] {
        self.0.quants
    }

    /// The family's `load`.
    pub fn loader(self) -> LoadFn {
        self.0.load
    }

    /// The file suffix each component prefers under `quant`.
    pub fn preferred_suffix(self, quant: Quant, component: Component) -> &'static str {
        match quant {
            Quant::Q4Mixed => match component {
                Component::EmbedTokens | Component::VisionEncoder => "_quantized",
                Component::DecoderModelMerged | Component::AudioEncoder => "_q4",
            },
            other => other.uniform_suffix(),
        }
    }

    /// Suffixes to try, in order, when the preferred file is missing (model_interface.md §4.2 rule 3).
    pub fn candidate_suffixes(self, quant: Quant, component: Component) -> Vec<&'static str> {
        let mut out = vec![self.preferred_suffix(quant, component)];
        for s in (self.0.fallbacks)(component) {
            if !out.contains(s) {
                out.push(s);
            }
        }
        out
    }
}

/// One ONNX graph of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    EmbedTokens,
    DecoderModelMerged,
    VisionEncoder,
    AudioEncoder,
}

impl Component {
    pub fn file_stem(self) -> &'static str {
        match self {
            Self::EmbedTokens => "embed_tokens",
            Self::DecoderModelMerged => "decoder_model_merged",
            Self::VisionEncoder => "vision_encoder",
            Self::AudioEncoder => "audio_encoder",
        }
    }

    /// Text-only serving needs these; the encoders are optional (requests with media then get a 400).
    pub fn required(self) -> bool {
        matches!(self, Self::EmbedTokens | Self::DecoderModelMerged)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_stem())
    }
}

/// Quantization names as the original server spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quant {
    /// q4 decoder and audio encoder, int8 embeddings and vision encoder (the original server's default).
    Q4Mixed,
    /// `_q4` where a component has one, with the fallbacks of [`Family::candidate_suffixes`].
    Q4,
    Q4F16,
    /// `_quantized` (transformers.js "q8": dynamic int8).
    Quantized,
    Int8,
    Uint8,
    Bnb4,
    Fp16,
    Fp32,
}

pub const QUANT_NAMES: &[&str] = &[
    "Q4_MIXED",
    "Q4",
    "Q4_F16",
    "QUANTIZED",
    "INT8",
    "UINT8",
    "BNB4",
    "FP16",
    "FP32",
];

impl Quant {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().replace('-', "_").as_str() {
            "Q4_MIXED" => Self::Q4Mixed,
            "Q4" => Self::Q4,
            "Q4_F16" | "Q4F16" => Self::Q4F16,
            "QUANTIZED" | "Q8" => Self::Quantized,
            "INT8" => Self::Int8,
            "UINT8" => Self::Uint8,
            "BNB4" => Self::Bnb4,
            "FP16" => Self::Fp16,
            "FP32" => Self::Fp32,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q4Mixed => "Q4_MIXED",
            Self::Q4 => "Q4",
            Self::Q4F16 => "Q4_F16",
            Self::Quantized => "QUANTIZED",
            Self::Int8 => "INT8",
            Self::Uint8 => "UINT8",
            Self::Bnb4 => "BNB4",
            Self::Fp16 => "FP16",
            Self::Fp32 => "FP32",
        }
    }

    fn uniform_suffix(self) -> &'static str {
        match self {
            Self::Q4Mixed | Self::Q4 => "_q4",
            Self::Q4F16 => "_q4f16",
            Self::Quantized => "_quantized",
            Self::Int8 => "_int8",
            Self::Uint8 => "_uint8",
            Self::Bnb4 => "_bnb4",
            Self::Fp16 => "_fp16",
            Self::Fp32 => "",
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A model known by a display name.
#[derive(Debug, Clone, Copy)]
pub struct CatalogEntry {
    pub display: &'static str,
    pub repo: &'static str,
    pub family: Family,
}

/// The model `make run` serves by default.
pub const DEFAULT_MODEL: &str = "Gemma-3n-E2B-it-ONNX/Q4_MIXED";

/// Every family's known models, in registry order.
pub fn catalog() -> impl Iterator<Item = CatalogEntry> {
    Family::all().flat_map(|family| {
        family
            .0
            .catalog
            .iter()
            .map(move |&(display, repo)| CatalogEntry {
                display,
                repo,
                family,
            })
    })
}

pub fn by_display(name: &str) -> Option<CatalogEntry> {
    catalog().find(|e| e.display.eq_ignore_ascii_case(name))
}

pub fn by_repo(repo: &str) -> Option<CatalogEntry> {
    catalog().find(|e| e.repo.eq_ignore_ascii_case(repo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_mixed_matches_the_original_server() {
        let f = Family::by_name("gemma3n").unwrap();
        let q = Quant::Q4Mixed;
        assert_eq!(f.preferred_suffix(q, Component::EmbedTokens), "_quantized");
        assert_eq!(f.preferred_suffix(q, Component::DecoderModelMerged), "_q4");
        assert_eq!(
            f.preferred_suffix(q, Component::VisionEncoder),
            "_quantized"
        );
        assert_eq!(f.preferred_suffix(q, Component::AudioEncoder), "_q4");
        assert_eq!(
            f.candidate_suffixes(Quant::Fp32, Component::VisionEncoder),
            vec!["", "_quantized", "_uint8", "_fp16"]
        );
    }

    #[test]
    fn smolvlm_names_and_files() {
        let f = Family::by_name("smolvlm").unwrap();
        assert_eq!(Family::from_model_type("idefics3"), Some(f));
        assert_eq!(Family::from_model_type("smolvlm"), Some(f));
        assert_eq!(f.default_quant(), Quant::Uint8);
        assert!(!f.quants().contains(&Quant::Q4Mixed));
        for q in [
            "FP32",
            "FP16",
            "INT8",
            "UINT8",
            "Q4",
            "Q4_F16",
            "BNB4",
            "QUANTIZED",
        ] {
            assert!(f.quants().contains(&Quant::parse(q).unwrap()), "{q}");
        }
        assert_eq!(
            f.candidate_suffixes(Quant::Bnb4, Component::VisionEncoder),
            vec!["_bnb4", "_uint8", "_quantized", "_int8", "_fp16", ""]
        );
        assert_eq!(
            f.preferred_suffix(Quant::Q4F16, Component::EmbedTokens),
            "_q4f16"
        );
        let e = by_display("smolvlm-256m-instruct").unwrap();
        assert_eq!(e.repo, "HuggingFaceTB/SmolVLM-256M-Instruct");
        assert_eq!(by_repo(e.repo).unwrap().family, f);
    }

    #[test]
    fn granite_vision_names_and_files() {
        let f = Family::by_name("granite_vision").unwrap();
        assert_eq!(Family::from_model_type("llava_next"), Some(f));
        assert_eq!(f.default_quant(), Quant::Q4Mixed);
        assert_eq!(
            f.candidate_suffixes(Quant::Q4, Component::EmbedTokens),
            vec!["_q4", "_quantized", "_int8", ""]
        );
        assert_eq!(
            f.candidate_suffixes(Quant::Int8, Component::DecoderModelMerged),
            vec!["_int8", "_quantized", ""]
        );
        assert_eq!(
            f.preferred_suffix(Quant::Q4Mixed, Component::VisionEncoder),
            "_quantized"
        );
        let e = by_display("granite-vision-3.2-2b").unwrap();
        assert_eq!(by_repo(e.repo).unwrap().family, f);
    }

    #[test]
    fn the_registry_lists_each_family_once_with_its_names() {
        let names: Vec<&str> = Family::all().map(Family::name).collect();
        assert_eq!(names, ["gemma3n", "smolvlm", "granite_vision", "gemma4"]);
        for f in Family::all() {
            assert!(
                !f.quants().is_empty() && !f.model_types().is_empty(),
                "{f:?}"
            );
            assert!(f.components()[..2].iter().all(|c| c.required()), "{f:?}");
            for t in f.model_types() {
                assert_eq!(Family::from_model_type(t), Some(f));
            }
        }
        let displays: Vec<&str> = catalog().map(|e| e.display).collect();
        assert_eq!(
            displays,
            [
                "Gemma-3n-E2B-it-ONNX",
                "SmolVLM-256M-Instruct",
                "granite-vision-3.2-2b",
                "gemma-4-E2B-it-ONNX",
                "gemma-4-E4B-it-ONNX"
            ]
        );
        assert_eq!(Family::from_model_type("llama"), None);
    }

    #[test]
    fn quant_names_round_trip() {
        for n in QUANT_NAMES {
            assert_eq!(Quant::parse(n).unwrap().name(), *n);
        }
        assert_eq!(Quant::parse("q4_mixed"), Some(Quant::Q4Mixed));
        assert_eq!(Quant::parse("nope"), None);
    }
}
