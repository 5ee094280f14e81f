//! Model families, the display names users of the original Python server know, and quantization
//! names → per-component ONNX file suffixes (model_interface.md §1.1, §4).

use std::fmt;

/// A model family: which graphs it has and how its files are named. Chosen from `config.json`'s
/// `model_type`, never from the model's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Gemma3n,
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "gemma3n" => Some(Self::Gemma3n),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gemma3n => "gemma3n",
        }
    }

    /// The graphs of this family, required ones first.
    pub fn components(self) -> &'static [Component] {
        match self {
            Self::Gemma3n => &[
                Component::EmbedTokens,
                Component::DecoderModelMerged,
                Component::VisionEncoder,
                Component::AudioEncoder,
            ],
        }
    }

    pub fn default_quant(self) -> Quant {
        match self {
            Self::Gemma3n => Quant::Q4Mixed,
        }
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
        let fallbacks: &[&str] = match component {
            Component::EmbedTokens => &["_quantized", "_fp16", ""],
            Component::VisionEncoder => &["_quantized", "_uint8", "_fp16", ""],
            Component::AudioEncoder => &["_q4", "_quantized", "_fp16", ""],
            Component::DecoderModelMerged => &["_q4", "_quantized", "_fp16", ""],
        };
        let mut out = vec![self.preferred_suffix(quant, component)];
        for s in fallbacks {
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

pub const CATALOG: &[CatalogEntry] = &[CatalogEntry {
    display: "Gemma-3n-E2B-it-ONNX",
    repo: "onnx-community/gemma-3n-E2B-it-ONNX",
    family: Family::Gemma3n,
}];

/// The model `make run` serves by default.
pub const DEFAULT_MODEL: &str = "Gemma-3n-E2B-it-ONNX/Q4_MIXED";

pub fn by_display(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG
        .iter()
        .find(|e| e.display.eq_ignore_ascii_case(name))
}

pub fn by_repo(repo: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.repo.eq_ignore_ascii_case(repo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_mixed_matches_the_original_server() {
        let f = Family::Gemma3n;
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
    fn quant_names_round_trip() {
        for n in QUANT_NAMES {
            assert_eq!(Quant::parse(n).unwrap().name(), *n);
        }
        assert_eq!(Quant::parse("q4_mixed"), Some(Quant::Q4Mixed));
        assert_eq!(Quant::parse("nope"), None);
    }
}
